"""The run directory: one folder per training job, its file names, and the rules for starting and resuming one.

Every job (fine-tuning, pretraining, the cached base pretraining) writes the same kinds of file::

    config.json          the resolved config, written first: a folder with it is a run
    log.jsonl            one JSON record per optimizer step
    train_state.pt       what --resume needs, in one atomically written file (model, optimizer, step): no kill can
                         pair a model with another step's optimizer; deleted when the run finishes
    run.lock             locked by the process running it (its PID inside): a second process is refused
    metrics.json         written last: a folder with it is a finished run
    model.safetensors    fine-tuning: the classifier;  best/last.safetensors: pretraining's backbones
    export.json          the exporter's report, beside the artifacts it wrote

Example:
    >>> run = RunDir('runs/example')  # doctest: +SKIP
    >>> run.finished  # doctest: +SKIP
    False
"""
import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

from .config import ConfigError, apply_overrides
from .files import atomic_write

__all__ = ['RunError', 'RunDir', 'CONFIG_FILE', 'LOG_FILE', 'METRICS_FILE', 'MODEL_FILE', 'STATE_FILE', 'BEST_FILE',
           'LAST_FILE', 'CURVE_FILE', 'CONFUSION_FILE', 'EXPORT_FILE', 'LOCK_FILE', 'new_run', 'open_resumed',
           'save_state', 'load_state', 'add_run_arguments']

CONFIG_FILE, LOG_FILE, METRICS_FILE, STATE_FILE = 'config.json', 'log.jsonl', 'metrics.json', 'train_state.pt'
MODEL_FILE, EXPORT_FILE = 'model.safetensors', 'export.json'
BEST_FILE, LAST_FILE = 'best.safetensors', 'last.safetensors'
CURVE_FILE, CONFUSION_FILE = 'training_curve.png', 'confusion.png'
LOCK_FILE = 'run.lock'
# What a fresh start removes from a folder it reuses (--overwrite): every file a job writes, exports aside.
_JOB_FILES = (LOG_FILE, STATE_FILE, METRICS_FILE, MODEL_FILE, BEST_FILE, LAST_FILE, CURVE_FILE, CONFUSION_FILE)


class RunError(RuntimeError):
    """The run directory cannot be used as asked (finished, not a run, ...)."""


class RunDir:
    """The files of one run directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    def write_json(self, name: str, obj) -> None:
        atomic_write(self.path(name), lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + '\n'))

    def log(self, record: dict) -> None:
        with open(self.path(LOG_FILE), 'a') as f:
            f.write(json.dumps(record) + '\n')

    def records(self) -> list[dict]:
        """The step records of log.jsonl (none when there is no log yet)."""
        path = self.path(LOG_FILE)
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def trim_log(self, step: int) -> None:
        """Drop records past ``step``: written after the last checkpoint, they are about to be replayed."""
        if self.path(LOG_FILE).is_file():
            kept = [r for r in self.records() if r['step'] <= step]
            atomic_write(self.path(LOG_FILE), lambda tmp: tmp.write_text(''.join(json.dumps(r) + '\n' for r in kept)))

    @contextlib.contextmanager
    def lock(self, wait: bool = False, poll: float = 0.5):
        """Hold an exclusive lock on ``run.lock`` while inside (an OS file lock, so the kernel frees it when the process
        dies: a killed run's lock is taken over by the next one); another process holding it is refused in one line
        naming its PID, or waited for with ``wait``; this process's own lock is re-entered (the cache entry's run)."""
        created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(LOCK_FILE).resolve()
        if path in _HELD:
            yield self
            return
        with open(path, 'a+') as f:
            while not _try_lock(f):
                if not wait:
                    f.seek(0)
                    holder = f.read().strip() or 'unknown'
                    raise RunError(f'{self.root} is in use by process {holder} ({path.name}); wait for it to end or '
                                   'stop it, or choose another --out')
                time.sleep(poll)
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            _HELD.add(path)
            for tmp in self.root.glob('.*.tmp'):  # what a killed writer left half-written (atomic_write's names)
                tmp.unlink(missing_ok=True)
            try:
                yield self
            finally:
                _HELD.discard(path)
                f.truncate(0)  # the file stays (removing it could let two processes lock two files); the lock goes
                if created and [p.name for p in self.root.iterdir()] == [LOCK_FILE]:  # a start that wrote nothing
                    path.unlink(missing_ok=True)
                    self.root.rmdir()

    @property
    def started(self) -> bool:
        return self.path(CONFIG_FILE).is_file()

    @property
    def finished(self) -> bool:
        return self.path(METRICS_FILE).is_file()

    def start(self, cfg) -> None:
        """Create the folder, clear what an earlier job left, and write the resolved config."""
        self.root.mkdir(parents=True, exist_ok=True)
        for name in _JOB_FILES:
            self.path(name).unlink(missing_ok=True)
        self.write_json(CONFIG_FILE, dataclasses.asdict(cfg))


_HELD: set[Path] = set()  # lock files this process holds


def _try_lock(f) -> bool:
    """An exclusive, non-blocking OS lock on the open file ``f``; True where the OS has no file locks (Windows)."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def save_state(run: RunDir, **state) -> None:
    """What --resume needs, in one atomically written file (``train_state.pt``)."""
    import torch

    atomic_write(run.path(STATE_FILE), lambda tmp: torch.save(state, tmp))


def load_state(run: RunDir, required: tuple[str, ...] = ('step', 'model', 'optimizer')) -> dict | None:
    """The state `save_state` wrote, None when there is none; a damaged file is a one-line `RunError`."""
    import torch

    path = run.path(STATE_FILE)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated, garbled, empty: torch raises several kinds
        raise RunError(f'--resume {run.root}: {path} is damaged ({type(e).__name__}); start the run again with '
                       '--overwrite') from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise RunError(f'--resume {run.root}: {path} lacks {missing} (written by another version?); start the run '
                       'again with --overwrite')
    return state


def new_run(root: str | os.PathLike, overwrite: bool) -> RunDir:
    """The run directory for a new job, refusing to clobber a finished run, an unfinished one, or a foreign folder."""
    run = RunDir(root)
    if run.finished and not overwrite:
        raise RunError(f'{run.root} holds a finished run; pass --overwrite to replace it or --out for another '
                       'directory')
    if run.root.exists() and not run.root.is_dir():
        raise RunError(f'--out {run.root} is a file, not a folder; choose another --out')
    ours = {LOCK_FILE} | {f'.{name}.tmp' for name in (CONFIG_FILE, *_JOB_FILES)}  # what a killed start leaves
    if run.root.is_dir() and any(p.name not in ours for p in run.root.iterdir()) and not run.started:
        raise RunError(f'{run.root} exists and is not a run directory; choose another --out')
    nothing_yet = not run.path(LOG_FILE).is_file() and not run.path(STATE_FILE).is_file()
    if run.started and not run.finished and not overwrite and not nothing_yet:  # a start that failed: nothing lost
        raise RunError(f'{run.root} holds an unfinished run; continue it with --resume {run.root} or pass --overwrite')
    return run


def open_resumed(root: str | os.PathLike, config_cls: type):
    """The saved config (a ``config_cls``) and run directory of an interrupted run; reads only.

    Raises:
        RunError: Not a run, a finished run, or a run of another kind (its config does not fit ``config_cls``).
    """
    run = RunDir(root)
    if not run.started:
        raise RunError(f'--resume {run.root}: not a run directory (no {CONFIG_FILE})')
    if run.finished:
        raise RunError(f'--resume {run.root}: the run already finished (see {run.path(METRICS_FILE)})')
    try:
        saved = json.loads(run.path(CONFIG_FILE).read_text())
        cfg = apply_overrides(config_cls(), saved, source=str(run.path(CONFIG_FILE))).validate()
    except (OSError, ValueError, AttributeError) as e:  # ConfigError is a ValueError, and so is bad JSON
        kind = getattr(config_cls, 'recipe_kind', 'finetune')
        reason = str(e).splitlines()[0] if not isinstance(e, ConfigError) else str(e)
        raise RunError(f'--resume {run.root}: {CONFIG_FILE} is not a {kind} config ({reason})') from None
    return cfg, run


def add_run_arguments(parser, default_out: str) -> None:
    """The options every training command shares: where the run goes, its seed, resuming, overwriting, progress."""
    from .threads import add_threads_argument

    parser.add_argument('--out', help=f'run directory (default: {default_out})')
    parser.add_argument('--seed', type=int)
    parser.add_argument('--resume', type=Path, metavar='RUN_DIR', help='continue a run that was interrupted')
    parser.add_argument('--overwrite', action='store_true', help='replace a finished run in --out')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    add_threads_argument(parser)
