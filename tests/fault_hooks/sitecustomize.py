"""Fault injection for tests/test_faults.py and tests/test_distributed.py, loaded by Python at
start-up when this folder is on PYTHONPATH. Does nothing unless one of these is set:

* ``MTLCV_TEST_KILL_AT_STEP=K`` (and optionally ``MTLCV_TEST_KILL_RANK=r``, default 0): the process
  of that rank SIGKILLs itself when it is about to take optimizer step K + 1, on the first start
  only (torchrun's ``TORCHELASTIC_RESTART_COUNT`` is 0);
* ``MTLCV_TEST_HANG_IN_SAVE=MARKER``: the next ``last.pt`` write stops half-way (half the bytes
  on disk), creates the file MARKER and sleeps, so that a test can SIGKILL it mid-write.

* ``MTLCV_TEST_STEP_DELAY=S``: every optimizer step sleeps S seconds first (a slow run, so that
  a test can interrupt it mid-training on a busy machine);
* ``MTLCV_TEST_IMPORT=mod1,mod2`` (in a torchrun worker): import these modules first (e.g.
  ``ddp_worker``, which registers a test dataset).

Production code contains no hook: these patches replace functions from outside.
"""

import importlib
import os

if os.environ.get("MTLCV_TEST_IMPORT") and "RANK" in os.environ:
    for _name in os.environ["MTLCV_TEST_IMPORT"].split(","):
        importlib.import_module(_name)

if os.environ.get("MTLCV_TEST_KILL_AT_STEP") and os.environ.get("RANK", "0") == os.environ.get(
    "MTLCV_TEST_KILL_RANK", "0"
) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    import signal

    from mtlcv.engine import trainer as _trainer

    _kill_at = int(os.environ["MTLCV_TEST_KILL_AT_STEP"])
    _step = _trainer.Trainer.train_step

    def _train_step(self, batch):
        if self.global_step == _kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return _step(self, batch)

    _trainer.Trainer.train_step = _train_step

if os.environ.get("MTLCV_TEST_STEP_DELAY"):
    import time as _time

    from mtlcv.engine import trainer as _trainer

    _delay = float(os.environ["MTLCV_TEST_STEP_DELAY"])
    _slow_step = _trainer.Trainer.train_step

    def _delayed_step(self, batch):
        _time.sleep(_delay)
        return _slow_step(self, batch)

    _trainer.Trainer.train_step = _delayed_step

if os.environ.get("MTLCV_TEST_HANG_IN_SAVE"):
    import io
    import time

    from mtlcv.engine import checkpoint as _checkpoint

    _marker = os.environ["MTLCV_TEST_HANG_IN_SAVE"]
    _write = _checkpoint._write_atomically

    def _write_atomically(path, write, what):
        if path.name != "last.pt":
            return _write(path, write, what)

        def half(fh):
            buf = io.BytesIO()
            write(buf)
            data = buf.getvalue()
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
            open(_marker, "w").close()
            time.sleep(600)

        return _write(path, half, what)

    _checkpoint._write_atomically = _write_atomically
