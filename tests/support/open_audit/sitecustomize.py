"""Test harness: log every file a flow step's process opens for reading under a directory.

Put this directory on PYTHONPATH and set ``PETSEG_TEST_OPENS=LOG_DIR`` and
``PETSEG_TEST_OPENS_UNDER=ROOT``: each Python process then appends, to
``LOG_DIR/<pid>.log``, its command line once and the path of every file under
ROOT that it opens for reading (a Python audit hook on the ``open`` event), so
a test can see what each Metaflow task actually read from the datastore and
the blob store, independently of what petseg says it read. Without the
variables it does nothing.
"""

import os
import sys


def _install() -> None:
    log_dir, root = os.environ.get("PETSEG_TEST_OPENS"), os.environ.get("PETSEG_TEST_OPENS_UNDER")
    if not log_dir or not root:
        return
    root = os.path.realpath(root)
    path = os.path.join(log_dir, f"{os.getpid()}.log")
    state = {"started": False}

    def hook(event, args):
        if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        mode = args[1] if len(args) > 1 else None
        if isinstance(mode, str) and not mode.startswith("r"):
            return
        if mode is None and len(args) > 2 and isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR):
            return
        target = os.fsdecode(args[0])
        if not os.path.isabs(target) or not os.path.realpath(target).startswith(root + os.sep):
            return
        with open(path, "a", encoding="utf-8") as log:  # the audit hook sees this open as write: skipped
            if not state["started"]:
                state["started"] = True
                log.write("ARGV " + "\x1f".join(sys.argv) + "\n")
            log.write(os.path.realpath(target) + "\n")

    sys.addaudithook(hook)


_install()
