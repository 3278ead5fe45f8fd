"""Fine-tuning step time on a busy machine: OpenMP's wait policy (``OMP_WAIT_POLICY``), threads and background load.

The evidence behind `fewshot_lkca.threads.DEFAULT_THREADS`: which thread count and OpenMP wait policy keep a training
step fast on an idle machine and beside other busy processes. (An earlier version of the package set
``OMP_WAIT_POLICY=PASSIVE`` on the claim that spinning threads slow a step 10-20x under load; this benchmark did not
confirm it, and found one thread fastest everywhere.)

What is timed: one memory-lean fine-tuning step, the ``lean_5shot`` recipe (batch 2, the first 4 parameter groups
frozen, BatchNorm in eval mode, gradient checkpointing) on ``--model`` (default ``lkca_mobilenet``, random init) at
``--size`` px (default 96, the look-alike set's native size), built with finetune's own functions:
`fewshot_lkca.config.load_recipe`, `fewshot_lkca.finetune.build_classifier` (a cosine head from the prototypes of a
5 x 5 support set of random images), `set_trainable`, `make_optimizer` and, per step, `train_step` (train mode,
forward, label-smoothed cross-entropy, ``zero_grad``, backward, ``opt.step``, ``loss.item()``). ``--warmup`` steps,
then ``--steps`` steps each timed with ``time.perf_counter`` (wall) and ``time.process_time`` (the process's CPU time,
all its threads: a thread spinning while it waits shows here).

For every combination of

* wait policy (``--policies``): ``PASSIVE``, ``ACTIVE``, and ``default``: the variable unset,
  which is what torch gets without the package. torch's Linux wheels use GNU OpenMP (libgomp), which reads the
  variable once, when torch loads it: ``ACTIVE`` spins until there is work, ``PASSIVE`` sleeps at once, unset spins
  for a while (``GOMP_SPINCOUNT``, 300,000 by default) and then sleeps;
* torch intra-op threads (``--threads``, ``torch.set_num_threads``; 0 = torch's own choice, reported);
* background load (``--loads``): that many busy processes (pure-Python loops, started by this benchmark with
  no CPU affinity of their own, each ending by itself after ``--timeout`` + 10 s or as soon as this process is gone,
  and stopped in a ``finally``, Ctrl-C included),

the step runs in a fresh ``python -m benchmarks.threads --child`` process whose environment sets (or, for
``default``, removes) ``OMP_WAIT_POLICY`` before anything imports torch. The busy processes start before the child
and stop after it. ``--repeats`` rounds go over the whole grid (one process per combination per round); a combination's
samples are pooled.

Reported per combination: median and interquartile range (Q3 - Q1) of the step's wall time in ms; the slowdown
against the same policy and threads with no busy process; the time against PASSIVE at the same threads and load; the
CPU time the measuring process used per step; the CPU (in cores) the busy processes got during the timed steps; and
the CPU other processes on the machine used meanwhile (``/proc/stat`` busy time minus the child's and the busy
processes' own: on a shared machine this says how clean the row is). The date, CPU model, SIMD flags, CPU count
and load averages go with the results.

Run from the repository root (defaults: 3 policies x 2 thread counts x 3 loads x 2 rounds = 36 processes of 15
timed steps, about 3 min on 2 cores)::

    python -m benchmarks.threads
    python -m benchmarks.threads --policies PASSIVE,ACTIVE --threads 2 --loads 0,2 --steps 40 --repeats 3
    python -m benchmarks.threads --out benchmarks/results/threads.json
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.common import cpu_name

# Nothing here imports torch or fewshot_lkca at module level: the --child process must import torch itself, first,
# with the environment its parent chose.

__all__ = ['POLICIES', 'BusyLoad', 'cpu_flags', 'measure', 'benchmark', 'format_table', 'build_parser', 'main']

POLICIES = ('PASSIVE', 'ACTIVE', 'default')  # default: OMP_WAIT_POLICY absent from the child's environment
RECIPE = 'lean_5shot'
REPO = Path(__file__).resolve().parents[1]
# Flags that decide which kernels oneDNN / MKL pick (and so how long a step takes), in this order.
SIMD_FLAGS = ('sse4_2', 'avx', 'avx2', 'fma', 'avx_vnni', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'avx512_fp16',
              'amx_tile', 'amx_bf16', 'amx_int8')


# ------------------------------------------------------------------------------------------------ the machine
def cpu_flags() -> str:
    """The SIMD flags of the CPU that matter for torch's kernels, plus ``hypervisor`` (a VM), from /proc/cpuinfo."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('flags'):
                flags = set(line.split(':', 1)[1].split())
                return ' '.join([f for f in SIMD_FLAGS if f in flags] + (['hypervisor'] if 'hypervisor' in flags
                                                                          else []))
    except OSError:
        pass
    return 'unknown'


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path('/proc/loadavg').read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _busy_ticks() -> int | None:
    """Busy clock ticks of all CPUs since boot (/proc/stat: user + nice + system + irq + softirq); None off Linux."""
    try:
        fields = Path('/proc/stat').read_text().splitlines()[0].split()
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
        return user + nice + system + irq + softirq
    except (OSError, ValueError, IndexError):
        return None


def _process_ticks(pid: int) -> int | None:
    """utime + stime of a process in clock ticks (/proc/PID/stat); None when it is gone or off Linux."""
    try:
        fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------------------------------------ the load
# One busy process: a pure-Python loop, bounded in time, that also ends as soon as its parent is gone (re-parented).
# It ignores SIGINT: Ctrl-C in a terminal reaches the whole process group, and the parent's `finally` stops it.
_BUSY = '''\
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
deadline, parent = time.monotonic() + float(sys.argv[1]), os.getppid()
print('ready', flush=True)
while time.monotonic() < deadline and os.getppid() == parent:
    for _ in range(20000):
        pass
'''


class BusyLoad:
    """``count`` busy background processes for a ``with`` block, each ending by itself after ``seconds`` at most.

    Example:
        >>> with BusyLoad(2, seconds=60) as load:
        ...     load.pids  # the two processes, already running
    """

    def __init__(self, count: int, seconds: float = 60.0):
        if count < 0 or seconds <= 0:
            raise ValueError(f'BusyLoad needs count >= 0 and seconds > 0, got {count} and {seconds}')
        self.count, self.seconds = count, seconds
        self.procs: list[subprocess.Popen] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self) -> 'BusyLoad':
        try:
            for _ in range(self.count):
                proc = subprocess.Popen([sys.executable, '-c', _BUSY, str(self.seconds)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                self.procs.append(proc)
                if proc.stdout.readline().strip() != 'ready':  # it runs its loop from here on
                    raise RuntimeError(f'busy background process {proc.pid} did not start (exit {proc.poll()})')
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate every process (kill what is still there after 5 s) and reap it; safe to call twice."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs = []

    def __enter__(self) -> 'BusyLoad':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------ the child
def _child(spec: dict) -> dict:
    """In a fresh process whose environment the parent chose: build the lean step, warm up, time ``steps`` steps."""
    policy_seen = os.environ.get('OMP_WAIT_POLICY')  # before anything can set it
    import torch  # first, with the wait policy of this process's environment

    default_threads = torch.get_num_threads()
    if spec['threads']:
        torch.set_num_threads(spec['threads'])

    import fewshot_lkca
    from fewshot_lkca.config import apply_overrides, load_recipe
    from fewshot_lkca.finetune import build_classifier, make_optimizer, set_trainable, train_step

    cfg = apply_overrides(load_recipe(spec['recipe']), dict(model=spec['model'], image_size=spec['size'], export=[]),
                          source='bench').validate()
    torch.manual_seed(cfg.seed)
    backbone = fewshot_lkca.create_backbone(cfg.model, num_classes=0)  # random init
    g = torch.Generator().manual_seed(0)
    support_x = torch.randn(cfg.n_way * cfg.k_shot, 3, spec['size'], spec['size'], generator=g)
    support_y = torch.arange(cfg.n_way).repeat_interleave(cfg.k_shot)
    model = build_classifier(backbone, support_x, support_y, cfg)
    set_trainable(model, cfg, spec['size'])
    opt = make_optimizer(model, cfg)
    batch = torch.randperm(len(support_x), generator=g)[:cfg.batch_size]
    images, labels = support_x[batch], support_y[batch]

    for _ in range(spec['warmup']):
        train_step(model, opt, images, labels, cfg)
    wall, cpu = [], []
    load_before = [_process_ticks(pid) for pid in spec['load_pids']]
    busy_before, started = _busy_ticks(), time.perf_counter()
    own_before = time.process_time()
    for _ in range(spec['steps']):
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(model, opt, images, labels, cfg)
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    own = time.process_time() - own_before
    window, busy_after = time.perf_counter() - started, _busy_ticks()
    load_after = [_process_ticks(pid) for pid in spec['load_pids']]

    tick = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100
    load_cpu = others = None
    if all(v is not None for v in load_before + load_after):
        load_cpu = sum(a - b for a, b in zip(load_after, load_before, strict=True)) / tick
        if busy_before is not None and busy_after is not None:
            others = (busy_after - busy_before) / tick - own - load_cpu
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(
        wall_ms=wall, cpu_ms=cpu, omp_wait_policy=policy_seen, torch=torch.__version__,
        torch_default_threads=default_threads, torch_threads=torch.get_num_threads(),
        window_s=window, load_cores=None if load_cpu is None else load_cpu / window,
        others_cores=None if others is None else others / window,
        recipe=dict(name=spec['recipe'], model=cfg.model, batch_size=len(images), frozen_groups=cfg.frozen_groups,
                    freeze_bn_stats=cfg.freeze_bn_stats, grad_checkpointing=cfg.grad_checkpointing,
                    optimizer=cfg.optimizer, trainable=trainable))


# ------------------------------------------------------------------------------------------------ the parent
def _child_env(policy: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop('OMP_WAIT_POLICY', None)  # `import fewshot_lkca` in this process may have set it
    if policy != 'default':
        env['OMP_WAIT_POLICY'] = policy
    return env


def measure(policy: str, threads: int, load: int, steps: int = 15, warmup: int = 5, size: int = 96,
            model: str = 'lkca_mobilenet', timeout: float = 300) -> dict:
    """One fresh process timing ``steps`` lean steps beside ``load`` busy processes; the child's readings, plus
    ``load_pids`` (the busy processes, all stopped on return)."""
    if policy not in POLICIES:
        raise ValueError(f'policy must be one of {list(POLICIES)}, got {policy!r}')
    with BusyLoad(load, seconds=timeout + 10) as busy:
        spec = dict(recipe=RECIPE, model=model, size=size, threads=threads, steps=steps, warmup=warmup,
                    load_pids=busy.pids)
        try:
            proc = subprocess.run([sys.executable, '-m', 'benchmarks.threads', '--child', json.dumps(spec)],
                                  cwd=REPO, env=_child_env(policy), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f'measuring process ({policy}, {threads} threads, {load} busy) ran past '
                               f'{timeout:.0f} s') from None
        pids = busy.pids
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
        raise RuntimeError(f'measuring process ({policy}, {threads} threads, {load} busy) failed '
                           f'(exit {proc.returncode}): {tail}')
    return dict(json.loads(lines[-1]), load_pids=pids)


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4, method='inclusive')
    return q1, median, q3


def _mean(samples: Sequence[dict], key: str) -> float | None:
    values = [s[key] for s in samples]
    return None if any(v is None for v in values) else statistics.fmean(values)


def benchmark(policies: Sequence[str] = POLICIES, threads: Sequence[int] = (1, 2), loads: Sequence[int] = (0, 1, 2),
              steps: int = 15, warmup: int = 5, repeats: int = 2, size: int = 96, model: str = 'lkca_mobilenet',
              timeout: float = 300, log: Callable[[str], object] | None = None) -> list[dict]:
    """One row per (policy, threads, load), in that nesting order; see the module docstring.

    ``slowdown``: median / the median at the same policy and threads with no load (None when load 0 is not
    measured); ``vs_passive``: median / PASSIVE's at the same threads and load (None without PASSIVE).
    """
    keys = [(p, t, n) for p in policies for t in threads for n in loads]
    runs: dict[tuple, list[dict]] = {k: [] for k in keys}
    for round_ in range(repeats):
        for n in loads:  # one load level at a time: the rows to compare are measured close together
            for t in threads:
                for p in policies:
                    if log:
                        log(f'round {round_ + 1}/{repeats}: {p}, {t} thread(s), {n} busy process(es)')
                    runs[(p, t, n)].append(measure(p, t, n, steps, warmup, size, model, timeout))
    rows = []
    for p, t, n in keys:
        samples = runs[(p, t, n)]
        wall = [v for s in samples for v in s['wall_ms']]
        q1, median, q3 = _quartiles(wall)
        first = samples[0]
        rows.append(dict(
            policy=p, threads=t, torch_threads=first['torch_threads'], load=n, steps=len(wall), processes=len(samples),
            median_ms=median, q1_ms=q1, q3_ms=q3, iqr_ms=q3 - q1,
            cpu_ms_per_step=statistics.median(v for s in samples for v in s['cpu_ms']),
            load_cores=_mean(samples, 'load_cores') if n else 0.0, others_cores=_mean(samples, 'others_cores'),
            omp_wait_policy=first['omp_wait_policy'], torch_default_threads=first['torch_default_threads'],
            torch=first['torch'], recipe=first['recipe'], wall_ms=wall,
            load_pids=[pid for s in samples for pid in s['load_pids']]))
    by_key = {(r['policy'], r['threads'], r['load']): r for r in rows}
    for r in rows:
        base = by_key.get((r['policy'], r['threads'], 0))
        passive = by_key.get(('PASSIVE', r['threads'], r['load']))
        r['slowdown'] = r['median_ms'] / base['median_ms'] if base else None
        r['vs_passive'] = r['median_ms'] / passive['median_ms'] if passive else None
    return rows


def _ratio(value: float | None) -> str:
    return '-' if value is None else f'{value:.2f}x'


def _cores(value: float | None) -> str:
    return '-' if value is None else f'{max(value, 0.0):.2f}'


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of `benchmark` rows."""
    head = ['wait policy', 'threads', 'busy procs', 'median (ms)', 'IQR (ms)', 'vs unloaded', 'vs PASSIVE',
            'CPU per step (ms)', 'busy procs got (cores)', 'others (cores)']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join([':---'] + ['---:'] * (len(head) - 1)) + '|']
    for r in rows:
        threads = str(r['threads']) if r['threads'] else f"0 (= {r['torch_threads']})"
        cells = [r['policy'], threads, str(r['load']), f"{r['median_ms']:.1f}", f"{r['iqr_ms']:.1f}",
                 _ratio(r['slowdown']), _ratio(r['vs_passive']), f"{r['cpu_ms_per_step']:.1f}",
                 _cores(r['load_cores']) if r['load'] else '-', _cores(r['others_cores'])]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------ the CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m benchmarks.threads', description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--policies', default=','.join(POLICIES),
                        help=f"comma-separated OMP_WAIT_POLICY values: {', '.join(POLICIES)} (variable unset)")
    parser.add_argument('--threads', default='1,2', help='comma-separated torch thread counts (0: torch decides)')
    parser.add_argument('--loads', default='0,1,2', help='comma-separated numbers of busy background processes')
    parser.add_argument('--steps', type=int, default=15, help='timed steps per process')
    parser.add_argument('--warmup', type=int, default=5, help='untimed steps first')
    parser.add_argument('--repeats', type=int, default=2, help='rounds over the grid, one process per row each')
    parser.add_argument('--size', type=int, default=96, help='image height and width (px)')
    parser.add_argument('--model', default='lkca_mobilenet', help='timm model name (random init)')
    parser.add_argument('--timeout', type=float, default=300, help='seconds one measuring process may take')
    parser.add_argument('--out', type=Path, help='also write the rows and settings to this JSON file')
    parser.add_argument('--child', help=argparse.SUPPRESS)  # internal: one measurement, JSON in and out
    return parser


def _int_list(parser: argparse.ArgumentParser, option: str, text: str, low: int, high: int) -> list[int]:
    try:
        values = list(dict.fromkeys(int(v) for v in text.split(',') if v.strip()))
    except ValueError:
        parser.error(f'{option}: cannot read {text!r} as comma-separated integers')
    if not values:
        parser.error(f'{option} is empty')
    bad = [v for v in values if not low <= v <= high]
    if bad:
        parser.error(f'{option} must be between {low} and {high}, got {bad[0]}')
    return values


def command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    inherited = os.environ.get('OMP_WAIT_POLICY')
    by_name = {p.upper(): p for p in POLICIES}
    policies = list(dict.fromkeys(v.strip() for v in args.policies.split(',') if v.strip()))
    unknown = [p for p in policies if p.upper() not in by_name]
    if unknown or not policies:
        parser.error(f"--policies: unknown {unknown or 'empty'}; choose from {', '.join(POLICIES)}")
    policies = list(dict.fromkeys(by_name[p.upper()] for p in policies))
    cpus = _usable_cpus()
    threads = _int_list(parser, '--threads', args.threads, 0, cpus)
    loads = _int_list(parser, '--loads', args.loads, 0, 4 * cpus)
    for option, value, low in (('--steps', args.steps, 2), ('--warmup', args.warmup, 0),
                               ('--repeats', args.repeats, 1), ('--size', args.size, 32),  # the family's minimum
                               ('--timeout', args.timeout, 1)):
        if value < low:
            parser.error(f'{option} must be at least {low}, got {value}')

    started, load_start = time.perf_counter(), _loadavg()
    try:
        rows = benchmark(policies, threads, loads, args.steps, args.warmup, args.repeats, args.size, args.model,
                         args.timeout, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except RuntimeError as e:
        parser.error(str(e))
    first = rows[0]
    meta = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        cpu=f'{cpu_name()}/{platform.machine()}', cpu_flags=cpu_flags(), cores=os.cpu_count(), usable_cpus=cpus,
        platform=platform.platform(), python=platform.python_version(), torch=first['torch'],
        torch_default_threads=first['torch_default_threads'], inherited_omp_wait_policy=inherited,
        recipe=first['recipe'], size=args.size, policies=policies, threads=threads, loads=loads, steps=args.steps,
        warmup=args.warmup, repeats=args.repeats, unit='ms', load_average=dict(start=load_start, end=_loadavg()),
        seconds=round(time.perf_counter() - started, 1))
    table = format_table(rows)
    r = meta['recipe']
    print(f"Fine-tuning step under load, {meta['date']}, {meta['cpu']} ({meta['cpu_flags']}), {meta['cores']} "
          f"CPUs ({cpus} usable), torch {meta['torch']} (default {meta['torch_default_threads']} threads), "
          f"load average {load_start} at the start\n")
    print(table)
    print(f"\nOne {RECIPE} step of {r['model']} (random init, {args.size} px, batch {r['batch_size']}, "
          f"{r['frozen_groups']} groups frozen, BN eval, gradient checkpointing, {r['trainable']:,} trainable "
          f"parameters): median and IQR of {args.steps} timed steps x {args.repeats} process(es) after "
          f"{args.warmup} warm-up steps, each combination in a fresh process. 'default': OMP_WAIT_POLICY unset "
          f"(libgomp spins briefly, then sleeps). vs unloaded: same policy and threads with no busy process; "
          f"vs PASSIVE: same threads and load. CPU per step: the measuring process's CPU time (all threads). "
          f"busy procs got: CPU the pure-Python busy processes received during the timed steps; others: CPU used "
          f"by the rest of the machine meanwhile (nonzero: the row was measured on a machine busier than stated).")
    print(f"\nLoad average at the end: {meta['load_average']['end']}. Total time: {meta['seconds']:.0f} s.")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + '.tmp')
        tmp.write_text(json.dumps(dict(meta=meta, table=table, rows=rows), indent=2) + '\n')
        tmp.replace(args.out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return command(parser.parse_args(argv), parser)


if __name__ == '__main__':
    sys.exit(main())
