"""The ``imgcls`` command line: one small function per command over the Python API."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import warnings
from pathlib import Path

from .errors import UserError
from .train.config import add_train_arguments, complete_optional_values
from .train.recipes import LIST

log = logging.getLogger("imgcls")


def _input_shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CxHxW like 3x224x224, got {text!r}") from None
    if min(c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"every side must be at least 1, got {text!r}")
    return c, h, w


# --------------------------------------------------------------------------- commands


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, epochs=args.epochs)


def cmd_train(args) -> int | None:
    from .train import train
    from .train.config import options_from_args

    options = options_from_args(args)
    if options.get("recipe") == LIST:
        return cmd_recipes(args)
    if args.resume:
        result = train(None, args.resume, resume=True, progress=not args.quiet, epochs=options.get("epochs"),
                       nproc=options.get("nproc"))
    else:
        if not args.data or not args.out:
            raise UserError("imgcls train needs DATA and --out RUN_DIR (or --resume RUN_DIR)")
        result = train(args.data, args.out, progress=not args.quiet, **options)
    if result is None:  # a rank other than 0 under torchrun: rank 0 reports the run
        return None
    s = result.summary
    if s.get("interrupted"):  # a scheduler or `train && export` must not take this for a finished run
        print(f"interrupted; continue with: imgcls train --resume {result.run_dir}")
        return 128 + int(s.get("signal") or signal.SIGINT)
    print(f"best val accuracy {s['best_val_accuracy']:.4f} (epoch {s['best_epoch']}/{s['epochs']}), "
          f"{s['train_seconds']:.0f} s" + (f", test accuracy {s['test_accuracy']:.4f}" if "test_accuracy" in s else "")
          + (f", {s['train_flops'] / 1e15:.3g} PFLOP" if s.get("train_flops") else ""))
    if "val_recall" in s:
        print(f"val balanced accuracy {s['val_balanced_accuracy']:.4f}; recall: "
              + ", ".join(f"{c} {r:.2f}" for c, r in s["val_recall"].items()))
    if "val_mAP" in s:  # multilabel: the accuracy above is subset accuracy (the whole label set right)
        print(f"val mAP {s['val_mAP']:.4f}" + (f", test mAP {s['test_mAP']:.4f}" if "test_mAP" in s else "")
              + "; F1 per label at its tuned threshold: " + ", ".join(f"{c} {f:.2f}" for c, f in s["val_f1"].items()))
    int8 = s.get("int8") or {}
    if int8.get("kept"):  # predict, eval and serve will run this file on a CPU, so its figure is theirs
        print(f"predict, eval and serve on a CPU run model.int8.onnx: val accuracy {int8['int8_val_accuracy']:.4f}"
              f" (fp32 {int8['fp32_val_accuracy']:.4f}; --precision fp32 for that file)")
    print(f"run directory: {result.run_dir}")


def cmd_recipes(args) -> None:
    from .train.recipes import format_recipes

    print(format_recipes())


def cmd_eval(args) -> None:
    from .api import evaluate, save_evaluation

    kept = None if args.no_report else []  # per-image predictions for eval_report.html
    metrics = evaluate(args.run, args.data, split=args.split, backend=args.backend, precision=args.precision,
                       batch_size=args.batch_size, tta=args.tta,
                       write=False, progress=not (args.json or args.quiet), events=args.events,
                       aggregate=args.aggregate, event_gap=args.event_gap, event_column=args.event_column,
                       keep=kept)
    # the metrics first: a run directory that cannot be written must not cost the user the numbers
    print(json.dumps(metrics.to_dict(), indent=2) if args.json else metrics.to_text(), flush=True)
    saved = save_evaluation(metrics, args.run, kept[0] if kept else None, args.data)
    if saved is not None and not args.json:
        print(f"\nconfusion matrix: {saved} (and .csv)")


def cmd_predict(args) -> None:
    from .prediction.predict import check_options, load, predict_to_file
    from .prediction.shards import parse_shard

    check_options(args.batch_size, args.top_k)  # before the model loads or any file is touched
    parse_shard(args.shard, args.shard_by)
    predictor = load(args.run, backend=args.backend, precision=args.precision).with_threshold(args.threshold)
    if args.ray is None and (args.ray_actors is not None or args.ray_gpus_per_actor):
        raise UserError("--ray-actors and --ray-gpus-per-actor go with --ray")
    if args.ray is not None:  # --ray: the same rows, computed on a Ray cluster (cluster.py)
        from .prediction.cluster import ray_predictor

        predictor = ray_predictor(predictor, address=None if args.ray == "local" else args.ray,
                                  actors=args.ray_actors, gpus_per_actor=args.ray_gpus_per_actor)
    log.info("engine: %s", predictor.backend)
    result = predict_to_file(predictor, args.inputs, args.out, format=args.format, batch_size=args.batch_size,
                             top_k=args.top_k, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                             events=args.events, event_gap=args.event_gap, aggregate=args.aggregate, media=args.media,
                             sort_into=args.sort_into, sort_mode=args.sort_mode, shard=args.shard,
                             shard_by=args.shard_by)
    kept = f" (+ {result['kept']} kept from before)" if result["kept"] else ""
    shard = f" [shard {result['shard']}]" if result["shard"] else ""
    unreadable = f" ({result['errors']} unreadable, see the error column)" if result["errors"] else ""
    print(f"{result['images']} images{kept}{shard} -> {result['format']}: {', '.join(result['files'])}{unreadable}")
    if result["sorted"] is not None:
        piles = ", ".join(f"{folder} {n}" for folder, n in sorted(result["sorted"].items()))
        print(f"sorted ({args.sort_mode}) into {args.sort_into}: {piles}")


def cmd_merge(args) -> None:
    from .prediction.merge import merge

    result = merge(args.parts, args.out, overwrite=args.overwrite)
    print(f"{result['rows']} images from {result['parts']} parts -> {result['format']}: {', '.join(result['files'])}")


def cmd_thresholds(args) -> None:
    from .api import choose_thresholds

    result = choose_thresholds(args.run, args.data, args.label, args.target_recall, split=args.split,
                               backend=args.backend, batch_size=args.batch_size,
                               progress=not (args.json or args.quiet))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    label, chosen = args.label, result["chosen"]
    print(f"{result['images']} labelled images, {result['of_class']} of them {label!r}\n")
    print(f"| recall of the other classes (target) | threshold on P({label}) | set aside as {label} |"
          f" precision of that pile | images still reviewed | share reviewed |")
    print("|---|---|---|---|---|---|")
    for row in [*result["table"], chosen]:
        print(f"| {row['other_recall']:.4f} ({row['target_recall']:g}) | {row['threshold']:.4f} | {row['pile']} |"
              f" {row['pile_precision']:.4f} | {row['review']} | {row['review_share']:.1%} |")
    print(f"\nstored: {label} >= {chosen['threshold']:.4f} in {result['file']} (predictions below it are"
          f" 'uncertain'); curve: {result['plot']}")
    print("these figures hold for data like this labelled set; check them again on a new site or season")


def cmd_stats(args) -> None:
    from .data.preprocess import Preprocess
    from .data.sources import load_dataset
    from .data.stats import records_mean_std

    dataset = load_dataset(args.data)
    records = [r for recs in dataset.splits.values() for r in recs]
    spec = Preprocess(input_size=args.input_size, resize="squash", crop_pct=1.0)
    mean, std = records_mean_std(records, spec, limit=args.limit)
    print(f"images: {len(records)} in {len(dataset.classes)} classes")
    print(f"mean: {', '.join(f'{m:.4f}' for m in mean)}")
    print(f"std:  {', '.join(f'{s:.4f}' for s in std)}")
    print(f"(use: --mean {' '.join(map(str, mean))} --std {' '.join(map(str, std))})")


def cmd_models(args) -> None:
    from .models.catalog import catalog_rows, format_catalog

    print(format_catalog(catalog_rows()))


def cmd_summary(args) -> None:
    from .api import summary

    c, h, w = args.input or (3, None, None)
    if c != 3 or h != w:
        raise UserError("models take square 3-channel (RGB) input; use --input 3xSxS")
    table = summary(args.model, input_size=h, depth=args.depth, num_classes=args.num_classes,
                    include_bias=not args.no_bias)
    print(table.format(args.format))


def cmd_compare(args) -> None:
    from .models.compare import compare_models, format_comparison

    size = args.input[1] if args.input else None
    if not args.models and not args.runs:
        raise UserError("name models to compare, or give --runs RUN_DIR...")
    rows = compare_models(args.models, input_size=size, runs=args.runs or (), plot_path=args.plot, batch=args.batch,
                          repeats=args.repeats)
    print(format_comparison(rows, args.format))
    if args.plot:
        print(f"plot: {args.plot}")


def cmd_export(args) -> None:
    from .export import export_run, loss_of_points

    path = export_run(args.run, args.out, int8=args.int8, max_int8_loss=loss_of_points(args.int8_max_loss))
    print(f"exported {path}")


# report: its own block
def cmd_report(args) -> None:
    from .api import report

    path = report(args.run, args.data, out=args.out, split=args.split, backend=args.backend,
                  batch_size=args.batch_size, progress=not args.quiet)
    print(f"report: {path}")


# serve: its own block (the web server is an optional extra)
SERVE_MODULES = ("fastapi", "starlette", "uvicorn", "python_multipart")


def cmd_serve(args) -> None:
    try:
        from .serve import Limits, serve
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in SERVE_MODULES:
            raise
        raise UserError(f"`imgcls serve` needs {err.name}, which is not installed; install the web server with:"
                        " pip install 'imgcls[serve]'") from None
    given = {name: getattr(args, name) for name in ("max_upload_mb", "max_files", "batch_size", "batch_wait_ms",
                                                   "engine_threads", "engine_workers")}
    serve(args.run, host=args.host, port=args.port, backend=args.backend, precision=args.precision,
          limits=Limits(**{name: value for name, value in given.items() if value is not None}))


# --------------------------------------------------------------------------- parser


def _add_precision(parser: argparse.ArgumentParser) -> None:
    """predict, eval and serve: which of a run's ONNX files runs (checked by predict.load)."""
    parser.add_argument("--precision", choices=["auto", "int8", "fp32"], default="auto",
                        help="auto: on a CPU the run's model.int8.onnx when it has one (kept by training or"
                             " `imgcls export --int8` only within 1 point of val accuracy), else fp32; a GPU runs"
                             " fp32")


def _add_declared(parser: argparse.ArgumentParser, *names: str) -> None:
    """Training options another command shares: flag, type, default and help from their TrainConfig
    declaration."""
    from dataclasses import MISSING

    from .train.config import _scalar_type, declared, flag

    fields = {f.name: (f, opt) for f, opt in declared()}
    for name in names:
        f, opt = fields[name]
        parser.add_argument(flag(name), type=_scalar_type(f), default=None if f.default is MISSING else f.default,
                            help=opt.help)


def build_parser() -> argparse.ArgumentParser:
    from .evaluation.aggregate import AGGREGATES  # NumPy only, as the parser's other imports
    from .evaluation.tta import TTA

    parser = argparse.ArgumentParser(prog="imgcls", description="Train, evaluate and apply image classifiers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings, errors and results only (no progress bars)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="train and apply a small CNN on a built-in dataset (no data needed)")
    p.add_argument("--out", type=Path, default=None, help="folder for the demo data and run (default: a temp folder)")
    p.add_argument("--epochs", type=int, default=15)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a classifier on a class-folder tree, a CSV or a COCO Camera Traps .json")
    p.add_argument("data", nargs="?", help="folder of class folders (optionally train/ val/ test/), a CSV or a COCO"
                   " Camera Traps .json")
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run (optionally with more --epochs)")
    add_train_arguments(p)  # every option of TrainConfig, declared once in train/config.py
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="metrics of a trained model on labelled data")
    p.add_argument("run", help="run directory or model file")
    p.add_argument("data", help="labelled folder tree, CSV or COCO Camera Traps .json")
    p.add_argument("--split", help="which split of DATA (default: test, else val, else all)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto")
    _add_precision(p)
    p.add_argument("--batch-size", type=int, help="images per engine call (default: 8 on a CPU, 32 on a GPU)")
    p.add_argument("--tta", choices=list(TTA), default="none",
                   help="test-time augmentation: flip averages the logits of each image and its mirror image"
                        " (twice the compute); flip-shift also those of both moved one pixel up-left and down-right"
                        " (six views, airbench94's, for small images)")
    p.add_argument("--events", action="store_true",
                   help="score capture events too: the data's events (an event/group column, COCO sequences),"
                        " else frames within --event-gap per camera by EXIF time")
    p.add_argument("--aggregate", choices=list(AGGREGATES), default="mean",
                   help="--events: how an event's frame probabilities combine (max: each class's highest,"
                        " renormalized)")
    _add_declared(p, "event_column", "event_gap")  # the same options as training's, declared there
    p.add_argument("--no-report", action="store_true",
                   help="write no eval_report.html (the HTML report of these predictions) into the run directory")
    p.set_defaults(func=cmd_eval)

    from .evaluation.aggregate import AGGREGATES
    from .prediction.outputs import FORMATS, SORT_MODES
    from .prediction.shards import SHARD_BY

    p = sub.add_parser("predict", help="classify files, folders (recursive) or a CSV of paths")
    p.add_argument("run", help="run directory, model.safetensors or model.onnx")
    p.add_argument("inputs", nargs="+", help="image files, folders or CSVs with a path column")
    p.add_argument("--out", required=True,
                   help="file or folder to write: .csv, .jsonl, .json (MegaDetector batch output) or a folder"
                        " (Camtrap DP)")
    p.add_argument("--format", choices=list(FORMATS),
                   help="output format (default: from --out: .csv csv, .jsonl jsonl, .json megadetector, a folder"
                        " camtrapdp)")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--batch-size", type=int, help="images per engine call (default: 8 on a CPU, 32 on a GPU)")
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto")
    _add_precision(p)
    p.add_argument("--threshold", type=float, metavar="P",
                   help="one threshold for every class: below it a row's decision is 'uncertain' (replaces the"
                        " run's own, from `imgcls thresholds`)")
    p.add_argument("--events", action="store_true",
                   help="group the images into capture events (per camera folder, EXIF times within --event-gap)"
                        " and add an event column")
    _add_declared(p, "event_gap")  # as training and eval declare it
    p.add_argument("--aggregate", choices=list(AGGREGATES),
                   help="also one row per event from its frames' probabilities (implies --events): OUT.events.csv"
                        " / .jsonl, or event observations in Camtrap DP")
    p.add_argument("--media", metavar="MEDIA_CSV",
                   help="Camtrap DP: an existing media.csv; images are matched by filePath and keep its mediaID"
                        " and deploymentID; a deployments.csv beside it goes into the package as it is")
    p.add_argument("--sort-into", metavar="DIR",
                   help="afterwards, put every image into DIR/<decision or label>/ (DIR/_failed/ for unreadable"
                        " ones); the originals stay where they are")
    how = p.add_mutually_exclusive_group()
    for mode in SORT_MODES:
        how.add_argument(f"--{mode}", dest="sort_mode", action="store_const", const=mode,
                         help=f"--sort-into makes {'symbolic links (default)' if mode == 'link' else 'copies'}")
    p.set_defaults(sort_mode=next(iter(SORT_MODES)))
    p.add_argument("--shard", metavar="K/N",
                   help="predict only share K (1..N) of the inputs, chosen by a stable hash; each shard is its own"
                        " --out, joined by `imgcls merge` (SLURM: --shard ${SLURM_ARRAY_TASK_ID}/N)")
    p.add_argument("--shard-by", choices=list(SHARD_BY), default="path",
                   help="--shard hashes each file's path (default), or its folder, so a camera's folder and its"
                        " events stay in one shard")
    ray = p.add_argument_group("on a Ray cluster (pip install 'imgcls[cluster]')")
    ray.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                     help="run the model on a Ray cluster: ADDRESS (host:port, ray://host:port or auto) or, alone,"
                          " a cluster of this machine started for this run; same rows, same --resume")
    ray.add_argument("--ray-actors", type=int, metavar="N",
                     help="--ray: model copies (default: as many as the cluster's CPUs, or GPUs, allow)")
    ray.add_argument("--ray-gpus-per-actor", type=float, default=0.0, metavar="G",
                     help="--ray: GPUs for each model copy (default 0: CPU actors)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="--out exists (an interrupted run): keep its rows, predict only the images it lacks")
    again.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("merge", help="join the outputs of `imgcls predict --shard K/N` (or other outputs of one model)"
                                    " into one")
    p.add_argument("parts", nargs="+", help="the outputs to merge (each with its OUT.meta.json), e.g. out/part_*.csv")
    p.add_argument("--out", required=True, help="the merged output (same format as the parts)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("thresholds", help="choose a class's threshold on labelled data for a review budget"
                                         " (e.g. how many empty frames to set aside unseen)")
    p.add_argument("run", help="run directory (the threshold is stored there)")
    p.add_argument("data", help="labelled folder tree or CSV (its test split, else val, else all)")
    p.add_argument("--class", dest="label", required=True, help="the class whose pile is set aside, e.g. empty")
    p.add_argument("--target-recall", type=float, default=0.99,
                   help="share of the other classes' images that must stay out of that pile (default 0.99)")
    p.add_argument("--split", help="which split of DATA")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto")
    p.add_argument("--batch-size", type=int, help="images per engine call")
    p.set_defaults(func=cmd_thresholds)

    p = sub.add_parser("stats", help="per-channel mean and std of a dataset (for --mean/--std)")
    p.add_argument("data")
    p.add_argument("--input-size", type=int, default=64, help="images are resized to this before counting")
    p.add_argument("--limit", type=int, default=2000, help="at most this many images (evenly spaced)")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("recipes", help="list the training recipes (imgcls train --recipe NAME)")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("models", help="list the architectures with their size and cost")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("summary", help="per-layer cost table of a model")
    p.add_argument("model")
    p.add_argument("--input", type=_input_shape, help="CxHxW, e.g. 3x227x227 (default: the model's)")
    p.add_argument("--format", choices=["table", "csv", "md", "json"], default="table")
    p.add_argument("--depth", type=int, help="how deep to show nested modules")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--no-bias", action="store_true",
                   help="leave biases out of params and FLOPs (the convention of many lecture tables)")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("compare", help="which architecture? params, FLOPs, size, speed, accuracy side by side")
    p.add_argument("models", nargs="*")
    p.add_argument("--input", type=_input_shape, help="CxHxW (default: each model's)")
    p.add_argument("--runs", nargs="*", help="run directories to take accuracy from")
    p.add_argument("--plot", help="scatter plot PNG to write")
    p.add_argument("--batch", type=int, default=32, help="batch size of the throughput measurement")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats (median reported)")
    p.add_argument("--format", choices=["table", "csv", "md", "json"], default="table")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="export a run's model to ONNX (labels and preprocessing inside)")
    p.add_argument("run")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--int8", action="store_true", help="static int8 quantization, calibrated on training images")
    _add_declared(p, "int8_max_loss")
    p.add_argument("--out", help="file to write (default: RUN_DIR/model.onnx or model.int8.onnx)")
    p.set_defaults(func=cmd_export)

    # report: its own block
    p = sub.add_parser("report", help="one self-contained HTML page about a run: data, metrics, confusions with"
                                     " their images, calibration")
    p.add_argument("run", help="run directory")
    p.add_argument("--data", help="labelled folder tree, CSV or COCO .json to score now (as imgcls eval does);"
                                  " default: the run's own val/test predictions")
    p.add_argument("--out", help="HTML file to write (default: RUN/report.html; with --data RUN/eval_report.html)")
    p.add_argument("--split", help="--data: which split (default: test, else val, else all)")
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto")
    p.add_argument("--batch-size", type=int, help="--data: images per engine call")
    p.set_defaults(func=cmd_report)

    # serve: its own block; None defaults are serve.Limits' (the server's module is not imported to parse)
    p = sub.add_parser("serve", help="share a model: a web page and a JSON API (POST /predict) on a port")
    p.add_argument("run", help="run directory, model.safetensors or model.onnx")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto")
    _add_precision(p)
    p.add_argument("--max-upload-mb", type=float, help="largest request body in MB (default 20)")
    p.add_argument("--max-files", type=int, help="most images in one request (default 32)")
    p.add_argument("--batch-size", type=int, help="most images per engine call (default 8)")
    p.add_argument("--batch-wait-ms", type=float,
                   help="how long an image waits for others to share its engine call (default 5)")
    p.add_argument("--engine-threads", type=int,
                   help="ONNX Runtime threads of one engine call (default 1: calls run side by side instead)")
    p.add_argument("--engine-workers", type=int,
                   help="engine calls at once (default: CPUs / --engine-threads on ONNX Runtime, 1 on torch)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(complete_optional_values(sys.argv[1:] if argv is None else argv))
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    # INFO lines that are no result: the ONNX exporter's (about 80 per export) and ORT's quantizer's steps
    for name in ("onnx_ir", "onnxscript", "onnxruntime"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    if args.quiet:  # library warnings (Pillow, scikit-learn, matplotlib) are not results either
        warnings.simplefilter("ignore")
    try:
        code = args.func(args)
    except UserError as err:
        print(f"imgcls: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("imgcls: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as err:
        if err.name not in ("torch", "torchvision", "timm", "safetensors", "matplotlib", "sklearn"):
            raise
        print(f"imgcls: error: `imgcls {args.command}` needs {err.name}, which is not installed;"
              " install the training stack with: pip install 'imgcls[train]'", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `imgcls models | head`
        sys.stderr.close()
        return 0
    except OSError as err:  # the file system refused: a path, permissions, a full disk
        if args.verbose:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"imgcls: error: {where}{err.strerror or err}; check the path, its permissions and free space",
              file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
