"""One process of a run on several processes, as :func:`.distributed.launch` starts it.

``python -m imgcls.train.worker CONFIG_JSON LEVELS_JSON [--resume] [--progress]``: the launcher
has set ``RANK``/``WORLD_SIZE``, so :func:`imgcls.train.run` joins the others.  Nothing imports
this module, so it may import the package that launches it.
"""

from __future__ import annotations

import json
import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from ..errors import UserError
from . import TrainConfig, run
from .distributed import LAUNCHER_LOGGERS


def main(argv: list[str]) -> int:
    """A UserError goes to the launcher's error file (the launcher raises it) instead of a traceback."""
    cfg, levels = json.loads(argv[0]), json.loads(argv[1])
    logging.basicConfig(level=levels.pop(""), format="%(message)s")  # as the command line set it up
    for name, level in levels.items():
        if not name.startswith(LAUNCHER_LOGGERS):
            logging.getLogger(name).setLevel(level)
    try:
        run(TrainConfig.from_dict(cfg), "--resume" in argv, "--progress" in argv)
    except UserError as err:
        ErrorHandler().record_exception(err)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
