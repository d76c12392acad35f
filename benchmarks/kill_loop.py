"""Crash safety of `flexlora simulate`: SIGKILL it at random points of a round, resume, repeat.

    python benchmarks/kill_loop.py --trials 20            # prints one line per trial and a tally
    python benchmarks/kill_loop.py --trials 3 --json      # machine-readable

Each trial starts ``flexlora simulate --checkpoint-dir D --resume`` (tiny settings) and kills
it with SIGKILL at one of these points, chosen at random along with the round it hits:

* ``aggregation``  - inside the round's aggregation (``RoundAggregation.finalize``);
* ``ckpt-write``   - half-way through writing the checkpoint's temporary file;
* ``ckpt-rename``  - with the temporary file complete and fsynced, before ``os.replace``;
* ``random-time``  - from outside, 0-4 s (``KILL_MAX_S``) after the real CLI process's progress
  bar shows that a round has started (no hooks in the child).

The in-process points use a small child wrapper that installs the hook and then runs the
real CLI (``server.cli.main``); the hook sends SIGKILL to its own process, so nothing is
flushed or cleaned up, exactly as with an external kill. After every kill the checkpoint
must load (never torn) and hold the last round completed before the kill (exactly round k-1
for a kill inside round k), and the next trial's resume must start at the round after it.
At the end the run is resumed to completion and its final state is compared with a run that
was never interrupted (the runtime is deterministic for a seed).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
POINTS = ("aggregation", "ckpt-write", "ckpt-rename", "random-time")
# every setting a resume checks is pinned, so a change of a CLI default cannot break a resume
TINY = ["--strategy", "flexlora", "--clients", "3", "--heldout-clients", "1", "--seed", "0", "--local-steps", "1",
        "--batch-size", "2", "--lr", "0.01", "--alpha", "16", "--threads", "1", "--client-timeout", "600"]


def simulate_args(ckpt: Path, rounds: int) -> list[str]:
    return ["simulate", "--rounds", str(rounds), *TINY, "--checkpoint-dir", str(ckpt), "--resume", "--no-progress"]


# ----------------------------------------------------------------------------- child side

def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def child(point: str, kill_round: int, starts_log: str, cli_args: list[str]) -> int:
    """Install the kill hook for ``point`` at ``kill_round``, then run the real CLI."""
    from server.federation import checkpoint, rounds
    from server.federation.strategies import base

    state = {"round": 0}
    run_round = rounds.RoundEngine.run_round

    def logged_run_round(self, round, transport):
        state["round"] = round
        with open(starts_log, "a") as fh:
            fh.write(f"{round}\n")
            fh.flush()
            os.fsync(fh.fileno())
        return run_round(self, round, transport)

    rounds.RoundEngine.run_round = logged_run_round
    armed = lambda: state["round"] == kill_round  # noqa: E731

    if point == "aggregation":
        finalize = base.RoundAggregation.finalize

        def killing_finalize(self):
            if armed():
                _die()
            return finalize(self)

        base.RoundAggregation.finalize = killing_finalize
    elif point in ("ckpt-write", "ckpt-rename"):
        from server.federation.testing import CrashingOs

        where = {"ckpt-write": "write", "ckpt-rename": "replace"}[point]
        checkpoint.os = CrashingOs(where, _die, armed)
    from server.cli import main

    return main(cli_args)


# ----------------------------------------------------------------------------- parent side

def checkpoint_round(ckpt: Path) -> int:
    """Round of the checkpoint in ``ckpt`` (0: none); raises if it is torn or inconsistent."""
    from server.federation.checkpoint import load_checkpoint

    ck = load_checkpoint(ckpt)
    if ck is None:
        return 0
    rnd = int(ck.meta["round"])
    rounds = [h for h in ck.meta["history"] if "round" in h]
    if [h["round"] for h in rounds] != list(range(1, rnd + 1)):
        raise ValueError(f"checkpoint round {rnd} but history rounds {[h['round'] for h in rounds]}")
    if ck.meta["strategy"]["rounds_completed"] != rnd:
        raise ValueError(f"checkpoint round {rnd} but strategy rounds_completed {ck.meta['strategy']['rounds_completed']}")
    return rnd


def run_trial(ckpt: Path, rounds: int, point: str, rng: random.Random, env: dict) -> dict:
    before = checkpoint_round(ckpt)
    kill_round = before + 1 + (rng.random() < 0.3)
    with tempfile.NamedTemporaryFile("r", suffix=".starts", delete=False) as fh:
        starts_log = fh.name
    t0 = time.perf_counter()
    if point == "random-time":
        # the real CLI with its progress bar on: once a round has started, wait a random
        # fraction of a few seconds and SIGKILL it from outside
        args = [a for a in simulate_args(ckpt, rounds) if a != "--no-progress"]
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        first, err = _first_round_started(proc, timeout=600.0)
        if first is not None:
            time.sleep(rng.uniform(0.0, env_float("KILL_MAX_S", 4.0)))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        proc.wait()
        err += proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        starts = [first] if first is not None else []
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", point, str(kill_round), starts_log,
               "--", *simulate_args(ckpt, rounds)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        err = proc.stderr
        starts = [int(x) for x in Path(starts_log).read_text().split()]
    os.unlink(starts_log)
    killed = proc.returncode == -signal.SIGKILL
    result = {"point": point, "kill_round": kill_round if point != "random-time" else None, "before": before,
              "killed": killed, "returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    try:
        after = checkpoint_round(ckpt)
    except ValueError as exc:
        return {**result, "ok": False, "why": f"torn or unreadable checkpoint: {exc}"}
    result["after"] = after
    problems = []
    if starts and starts[0] != before + 1:
        problems.append(f"resume started at round {starts[0]}, last completed was {before}")
    if not killed and proc.returncode != 0 or (not killed and after < rounds):
        problems.append(f"exit {proc.returncode}: {err.strip().splitlines()[-1:] if err else ''}")
    if killed and point != "random-time" and after != kill_round - 1:
        problems.append(f"killed in round {kill_round}, checkpoint holds round {after}, expected {kill_round - 1}")
    if after < before:
        problems.append(f"checkpoint went back from round {before} to {after}")
    return {**result, "ok": not problems, "why": "; ".join(problems)}


def _first_round_started(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str]:
    """Read the child's stderr until its progress bar shows a round; (round, text so far)."""
    import re
    import select

    buf, deadline = b"", time.monotonic() + timeout
    fd = proc.stderr.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            m = re.search(rb"round (\d+)/\d+", buf)
            if m:
                return int(m.group(1)), buf.decode(errors="replace")
        elif proc.poll() is not None:
            break
    return None, buf.decode(errors="replace")


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def final_state(ckpt: Path) -> dict[str, np.ndarray]:
    from server.federation.checkpoint import load_checkpoint

    return load_checkpoint(ckpt).strategy_tensors


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        sep = argv.index("--")
        point, kill_round, starts_log = argv[1], int(argv[2]), argv[3]
        return child(point, kill_round, starts_log, argv[sep + 1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=None, help="rounds of the run (default: 3 * trials + 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--points", default=",".join(POINTS), help=f"comma-separated subset of {POINTS}")
    ap.add_argument("--no-compare", action="store_true", help="skip the uninterrupted reference run")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    points = args.points.split(",")
    if args.trials < 1 or any(p not in POINTS for p in points):
        raise SystemExit(f"--trials must be >= 1 and --points a subset of {POINTS}")
    rounds = args.rounds or 3 * args.trials + 4
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="flexlora-kill-"))
    ckpt = work / "run"
    shutil.rmtree(ckpt, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    print(f"kill loop: {args.trials} trials, points {points}, run of {rounds} rounds in {ckpt}", flush=True)
    trials = []
    for i in range(args.trials):
        point = points[i % len(points)] if i < len(points) else rng.choice(points)
        t = run_trial(ckpt, rounds, point, rng, env)
        trials.append(t)
        print(f"trial {i + 1:>2}: {t['point']:<12} round {t.get('kill_round') or '?':>2}  checkpoint "
              f"{t['before']:>2} -> {t.get('after', '?'):>2}  {'killed' if t['killed'] else 'exit ' + str(t['returncode'])}"
              f"  {t['seconds']:5.1f} s  {'ok' if t['ok'] else 'FAIL: ' + t['why']}", flush=True)
    # finish the run from the last checkpoint; the resume must start right after it
    last = checkpoint_round(ckpt)
    with tempfile.NamedTemporaryFile("r", suffix=".starts", delete=False) as fh:
        starts_log = fh.name
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "none", "0", starts_log, "--",
                           *simulate_args(ckpt, rounds)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    starts = [int(x) for x in Path(starts_log).read_text().split()]
    os.unlink(starts_log)
    finish_ok = done.returncode == 0 and checkpoint_round(ckpt) == rounds and (not starts or starts[0] == last + 1)
    same = None
    if not args.no_compare and finish_ok:
        ref = work / "reference"
        shutil.rmtree(ref, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "server.cli", *simulate_args(ref, rounds)], cwd=ROOT, env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        a, b = final_state(ckpt), final_state(ref)
        same = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    killed = sum(t["killed"] for t in trials)
    ok = sum(t["ok"] for t in trials)
    tally = {"trials": len(trials), "killed": killed, "ok": ok, "torn": sum("torn" in t["why"] for t in trials),
             "by_point": {p: sum(t["point"] == p for t in trials) for p in points},
             "finished_from_round": last, "finish_ok": finish_ok, "final_state_equals_uninterrupted": same}
    print(f"tally: {ok}/{len(trials)} trials ok, {killed} killed mid-run, {tally['torn']} torn checkpoints; "
          f"finish from round {last}: {'ok' if finish_ok else 'FAILED'}; final state equals an uninterrupted run: {same}")
    if args.json:
        print(json.dumps({"tally": tally, "trials": trials}, indent=1))
    return 0 if ok == len(trials) and finish_ok and same is not False else 1


if __name__ == "__main__":
    sys.exit(main())
