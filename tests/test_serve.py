"""`imgcls serve` through HTTP against a real uvicorn server on 127.0.0.1, on a model trained here."""

from __future__ import annotations

import csv
import json
import re
import shutil
import socket
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST
from imagezoo import write_bad_file_zoo, write_image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import imgcls  # noqa: E402
from imgcls.cli import build_parser, main  # noqa: E402
from imgcls.data.decode import ImageError, load_uint8, load_uint8_bytes  # noqa: E402
from imgcls.data.preprocess import Preprocess  # noqa: E402
from serving import cli_server, thread_server  # noqa: E402

MAX_FILES = 6
MAX_MB = 2


@pytest.fixture(scope="module")
def run_dir(tiny_tree, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    result = imgcls.train(tiny_tree, root / "run", epochs=1, progress=False, **{**FAST, "export_onnx": True})
    # thresholds make decisions; 0.5 splits this barely trained model's predictions
    (Path(result.run_dir) / "thresholds.json").write_text(json.dumps({"thresholds": {c: 0.5 for c in
                                                                                     ("cat", "dog", "fox")}}))
    return Path(result.run_dir)


@pytest.fixture(scope="module")
def images(tiny_tree):
    return sorted(tiny_tree.glob("*/*.png"))[::4]  # 12 images, every class


@pytest.fixture(scope="module")
def server_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("server_tmpdir")


@pytest.fixture(scope="module")
def server(run_dir, server_tmp, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    with cli_server(run_dir, log, "--max-files", str(MAX_FILES), "--max-upload-mb", str(MAX_MB),
                    "--batch-wait-ms", "20", env={"TMPDIR": str(server_tmp)}) as url:
        yield url


@pytest.fixture(scope="module")
def expected(run_dir, images, tmp_path_factory):
    """`imgcls predict`'s rows for the same files, by file name."""
    out = tmp_path_factory.mktemp("serve_cli") / "rows.csv"
    assert main(["-q", "predict", str(run_dir), *map(str, images), "--out", str(out), "--top-k", "3"]) == 0
    with out.open(newline="") as handle:
        return {Path(row["path"]).name: row for row in csv.DictReader(handle)}


def _files(paths):
    return [("file", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _check_against_cli(entry: dict, row: dict) -> None:
    assert entry["error"] is None
    assert [t["label"] for t in entry["top_k"]] == [row[f"label_{r}"] for r in (1, 2, 3)]
    assert np.allclose([t["prob"] for t in entry["top_k"]], [float(row[f"prob_{r}"]) for r in (1, 2, 3)], atol=1e-5)
    assert (entry["label"], entry["decision"]) == (row["label"], row["decision"])


# --------------------------------------------------------------------------- decoding from memory


def test_bytes_decode_like_files(tmp_path):
    """Every good and broken file of the zoo decodes from its bytes as from its path, or fails the same way."""
    spec = Preprocess(input_size=32, resize="shorter", crop_pct=0.875)
    for name, entry in write_bad_file_zoo(tmp_path).items():
        data = entry.path.read_bytes()
        try:
            want = load_uint8(entry.path, spec)
        except ImageError as err:
            with pytest.raises(ImageError) as got:
                load_uint8_bytes(data, spec, name=entry.path.name)
            assert got.value.reason == err.reason, name
            assert str(got.value) == f"{entry.path.name}: {err.reason}"
            continue
        assert np.array_equal(load_uint8_bytes(data, spec), want), name


# --------------------------------------------------------------------------- the API


def test_predictions_equal_imgcls_predict(server, images, expected):
    results = []
    for start in range(0, len(images), MAX_FILES):
        response = httpx.post(f"{server}/predict", params={"top_k": 3}, files=_files(images[start:start + MAX_FILES]),
                              timeout=60)
        assert response.status_code == 200
        results += response.json()["results"]
    assert [r["name"] for r in results] == [p.name for p in images]  # in request order
    for entry in results:
        _check_against_cli(entry, expected[entry["name"]])
    assert {r["decision"] for r in results} <= {"cat", "dog", "fox", "uncertain"}


def test_default_top_k_is_capped_by_the_labels(server, images):
    entry = httpx.post(f"{server}/predict", files=_files(images[:1]), timeout=60).json()["results"][0]
    assert len(entry["top_k"]) == 3  # default 5, three classes
    assert entry["prob"] == entry["top_k"][0]["prob"]
    assert sum(t["prob"] for t in entry["top_k"]) == pytest.approx(1.0, abs=1e-9)


def test_a_corrupt_image_among_good_ones_gets_its_own_error(server, images, expected, tmp_path):
    truncated = images[1].read_bytes()[:60]
    files = _files(images[:1]) + [("file", ("cut.png", truncated, "image/png"))] + _files(images[2:3])
    response = httpx.post(f"{server}/predict", params={"top_k": 3}, files=files, timeout=60)
    assert response.status_code == 200
    first, bad, last = response.json()["results"]
    _check_against_cli(first, expected[images[0].name])
    _check_against_cli(last, expected[images[2].name])
    assert bad["name"] == "cut.png" and bad["label"] is None and bad["top_k"] == []
    assert "truncated" in bad["error"] or "corrupt" in bad["error"]


@pytest.mark.parametrize("files, status, reason", [
    ([("file", ("notes.png", b"just some text", "image/png"))], 415, "not an image"),
    ([("file", ("a.txt", b"text", "text/plain")), ("file", ("b.png", b"", "image/png"))], 422, None),
    ([("file", ("cut.png", None, "image/png"))], 422, "truncated"),
])
def test_a_request_with_no_readable_image(server, images, files, status, reason):
    files = [(f, (n, images[0].read_bytes()[:80] if data is None else data, t)) for f, (n, data, t) in files]
    response = httpx.post(f"{server}/predict", files=files, timeout=60)
    assert response.status_code == status
    results = response.json()["results"]
    assert len(results) == len(files) and all(r["error"] for r in results)
    if reason:
        assert reason in results[0]["error"]


def test_requests_refused_whole(server, images):
    assert httpx.post(f"{server}/predict", data={"other": "x"}, files={"x": ("a.png", b"1")}).status_code == 422
    not_multipart = httpx.post(f"{server}/predict", content=images[0].read_bytes(),
                               headers={"content-type": "image/png"})
    assert not_multipart.status_code == 415 and "multipart/form-data" in not_multipart.json()["detail"]
    assert httpx.post(f"{server}/predict", params={"top_k": 0}, files=_files(images[:1])).status_code == 422


def test_too_many_files_is_413(server, images):
    assert httpx.post(f"{server}/predict", files=_files(images[:MAX_FILES]), timeout=60).status_code == 200
    response = httpx.post(f"{server}/predict", files=_files(images[:MAX_FILES + 1]), timeout=60)
    assert response.status_code == 413 and f"at most {MAX_FILES} images" in response.json()["detail"]


def test_too_large_is_413_by_header_and_by_count(server):
    big = b"\0" * (MAX_MB * 1024 * 1024 + 1)
    response = httpx.post(f"{server}/predict", files=[("file", ("big.png", big, "image/png"))], timeout=60)
    assert response.status_code == 413 and "too large" in response.json()["detail"]

    def stream():  # chunked: no Content-Length to check, so the bytes are counted
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
        for _ in range(MAX_MB + 1):
            yield b"\0" * (1024 * 1024)
        yield b"\r\n--xyz--\r\n"

    response = httpx.post(f"{server}/predict", content=stream(), timeout=60,
                          headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert response.status_code == 413
    assert httpx.get(f"{server}/health").json()["refused"] >= 2


def test_health_and_info(server, run_dir):
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and set(health["engine"]) >= {"engine_calls", "batch_sizes", "mean_batch"}
    info = httpx.get(f"{server}/info").json()
    assert info["labels"] == json.loads((run_dir / "labels.json").read_text())
    assert Preprocess.from_dict(info["preprocess"]) == Preprocess.load(run_dir / "preprocess.json")
    assert info["model"] == "cifarnet" and info["engine"].startswith("onnxruntime")
    assert info["thresholds"] == {"cat": 0.5, "dog": 0.5, "fox": 0.5}
    assert info["limits"]["max_files"] == MAX_FILES and info["limits"]["max_upload_bytes"] == MAX_MB * 1024 * 1024
    assert re.fullmatch(r"\d+\.\d+.*", info["imgcls_version"])


def test_docs_and_page_use_local_assets_only(server):
    for path in ("/docs", "/"):
        html = httpx.get(server + path).text
        refs = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)', html)
        assert refs, path
        assert not [r for r in refs if re.match(r"(https?:)?//", r)], (path, refs)
        for ref in refs:
            if ref.startswith(("data:", "#")) or ref in ("docs", "info", "health"):
                continue
            asset = httpx.get(f"{server}/{ref.lstrip('/')}")
            assert asset.status_code == 200 and asset.content, ref
    assert "SwaggerUIBundle" in httpx.get(f"{server}/docs").text
    schema = httpx.get(f"{server}/openapi.json").json()
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["file"]["items"]["format"] == "binary"


def test_concurrent_requests_are_answered_and_batched(server, images, expected):
    before = httpx.get(f"{server}/health").json()["engine"]

    def post(path):
        with httpx.Client(timeout=120) as client:
            return client.post(f"{server}/predict", params={"top_k": 3}, files=_files([path]))

    paths = [images[i % len(images)] for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(post, paths))
    for path, response in zip(paths, responses):
        assert response.status_code == 200
        _check_against_cli(response.json()["results"][0], expected[path.name])
    after = httpx.get(f"{server}/health").json()["engine"]
    calls = after["engine_calls"] - before["engine_calls"]
    assert after["images"] - before["images"] == 16
    assert calls < 16, after  # some engine calls served several requests
    assert max(map(int, after["batch_sizes"])) > 1


def test_engine_workers_run_batches_side_by_side(run_dir, images):
    """Two engine workers: two batches are in the engine at the same moment (a barrier in the call only
    opens for two), and every image still gets its own probabilities."""
    import asyncio
    import threading

    from imgcls.prediction.predict import load
    from imgcls.serve import Batcher, Limits

    from imgcls.system import available_cpus

    predictor = load(run_dir, threads=1)
    assert predictor.engine.threads == 1 and Limits().workers(predictor) == available_cpus()
    assert Limits().workers(load(run_dir)) == 1  # an engine on every CPU: one call at a time
    assert Limits(engine_workers=3).workers(predictor) == 3
    both_in = threading.Barrier(2, timeout=30)
    real = predictor.predict_proba

    def predict_proba(batch):
        both_in.wait()  # raises BrokenBarrierError unless a second call arrives meanwhile
        return real(batch)

    predictor.predict_proba = predict_proba
    pixels = [load_uint8(path, predictor.preprocess) for path in images[:4]]

    async def run():
        batcher = Batcher(predictor, batch_size=2, wait_s=0.05, workers=2)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.probabilities(x) for x in pixels)), batcher.stats()
        finally:
            await batcher.stop()

    probs, stats = asyncio.run(run())
    assert stats["engine_calls"] == 2 and stats["batch_sizes"] == {"2": 2}
    np.testing.assert_allclose(np.stack(probs), real(np.stack(pixels)), atol=1e-6)


# --------------------------------------------------------------------------- nothing on disk


def test_uploads_never_touch_a_temp_file(run_dir, server, server_tmp, monkeypatch, tmp_path):
    """A 1.5 MB upload (Starlette's form parser would spool it to a temp file) leaves tempfile untouched.

    Nothing appears in the server subprocess's TMPDIR; as Linux temp files are unlinked at birth (O_TMPFILE), the
    proof is the in-process server, where every tempfile entry point is watched."""
    from imgcls.prediction.predict import load
    from imgcls.serve import Limits, create_app

    made = []
    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        real = getattr(tempfile, name)
        monkeypatch.setattr(tempfile, name, lambda *a, _real=real, _name=name, **k: made.append(_name) or _real(*a, **k))
    # the detector sees a spool that rolls over to disk
    with tempfile.SpooledTemporaryFile(max_size=10) as spool:
        spool.write(b"x" * 100)
    assert made == ["TemporaryFile"]
    made.clear()

    rng = np.random.default_rng(0)
    big = tmp_path / "big.png"
    write_image(big, array=rng.integers(0, 256, (720, 720, 3), dtype=np.uint8))
    assert 1.2e6 < big.stat().st_size < 2e6
    at_start = sorted(server_tmp.iterdir())  # ONNX Runtime leaves a small .ses file there when it starts
    response = httpx.post(f"{server}/predict", files=_files([big]), timeout=60)
    assert response.status_code == 200 and response.json()["results"][0]["error"] is None
    assert sorted(server_tmp.iterdir()) == at_start
    app = create_app(load(run_dir), Limits(max_upload_mb=4))
    with thread_server(app) as url:
        response = httpx.post(f"{url}/predict", files=_files([big]), timeout=60)
        assert response.status_code == 200 and response.json()["results"][0]["label"] in ("cat", "dog", "fox")
        too_big = httpx.post(f"{url}/predict", files=[("file", ("x.png", b"\0" * (5 << 20)))], timeout=60)
        assert too_big.status_code == 413
    assert made == []


# --------------------------------------------------------------------------- the command line


def test_serve_binds_loopback_only_by_default(server):
    """Bound to 127.0.0.1 itself, not every address: another loopback address (Linux routes 127/8 to lo)
    is refused, as an outside interface would be."""
    port = int(server.rsplit(":", 1)[1])
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5)
    assert build_parser().parse_args(["serve", "run"]).host == "127.0.0.1"


def test_bad_serve_options_are_one_line_errors(run_dir, capsys):
    assert main(["serve", str(run_dir), "--max-files", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "imgcls: error: --max-files must be at least 1, not 0"
    assert main(["serve", str(run_dir), "--engine-threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "imgcls: error: --engine-threads must be at least 1, not 0"
    assert main(["serve", str(run_dir), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


def test_serve_takes_the_precision_predict_takes(run_dir, tmp_path, capsys):
    assert main(["serve", str(run_dir), "--precision", "int8"]) == 2  # this run kept no int8 file
    err = capsys.readouterr().err
    assert "has no model.int8.onnx" in err and "--precision fp32" in err
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shutil.copy(run / "model.onnx", run / "model.int8.onnx")  # an int8 file, as far as the choice goes
    for precision, file in (("auto", "model.int8.onnx"), ("fp32", "model.onnx")):
        with cli_server(run, tmp_path / f"{precision}.log", "--precision", precision) as url:
            assert httpx.get(f"{url}/info").json()["engine"].endswith(f"({file})"), precision


def test_serve_without_the_extra_says_what_to_install(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "imgcls.serve", raising=False)
    assert main(["serve", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install 'imgcls[serve]'" in err and "fastapi" in err


def test_docs_without_swagger_files_points_to_the_schema(monkeypatch):
    import importlib.util

    from imgcls import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "swagger_ui" else real(name, *a))
    html = serve._docs_page("t").body.decode()
    assert 'href="openapi.json"' in html and "pip install 'imgcls[serve]'" in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
