"""Study: OpenMP's wait policy and the teacher thread, alone and with two runs sharing the cores.

    python bench/studies/openmp_policy.py [--rounds 20] [--spin 10000]

The digits training step (FM; Self-Flow with the teacher inline and on its second thread) runs in
one child process per setting, since libgomp reads its wait policy once, at start:
PASSIVE (the platform's setting: idle threads sleep at once) against spinning (the policy unset,
GOMP_SPINCOUNT=--spin: idle threads spin that many iterations, then sleep). Children step one at a
time, round-robin with the order reversed every round, so every ratio is paired within a round.
Then each FM child steps side by side with a twin of the same setting (two runs sharing the two
cores, as a sweep's trials do), and the median step time is compared to the same child stepping
alone. Prints one table; the README's Devices section quotes it.
"""
from __future__ import annotations

import argparse
import statistics
import time

from bench import workloads as setup
from bench.procs import StepWorker


def settings(spin: int) -> dict[str, tuple[setup.BenchConfig, dict]]:
    passive = {"OMP_WAIT_POLICY": "PASSIVE"}
    spinning = {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": str(spin)}
    selfflow = setup.digits("selfflow")
    return {
        "FM, PASSIVE": (setup.digits("fm"), passive),
        "FM, spinning": (setup.digits("fm"), spinning),
        "Self-Flow, PASSIVE, teacher thread": (selfflow.with_(extra=(setup.TEACHER_THREAD_ALWAYS,)), passive),
        "Self-Flow, PASSIVE, teacher inline": (selfflow.with_(extra=(setup.TEACHER_THREAD_OFF,)), passive),
        "Self-Flow, spinning, teacher thread": (selfflow.with_(extra=(setup.TEACHER_THREAD_ALWAYS,)), spinning),
        "Self-Flow, spinning, teacher inline": (selfflow.with_(extra=(setup.TEACHER_THREAD_OFF,)), spinning),
    }


def timed(step) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def side_by_side(first: StepWorker, second: StepWorker) -> float:
    """Both children step at once; the first one's step time (sent, then both awaited)."""
    started = time.perf_counter()
    first.send_step()
    second.send_step()
    first.wait_step()
    elapsed = time.perf_counter() - started
    second.wait_step()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--spin", type=int, default=10000, help="GOMP_SPINCOUNT of the spinning children")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    scratch = "runs/.cache/bench/scratch"
    setups = settings(args.spin)
    workers = {name: StepWorker(config, env, args.threads, scratch) for name, (config, env) in setups.items()}
    twins = {name: StepWorker(*setups[name], args.threads, scratch) for name in ("FM, PASSIVE", "FM, spinning")}
    try:
        for worker in [*workers.values(), *twins.values()]:
            worker()  # warm-up
        alone: dict[str, list[float]] = {name: [] for name in workers}
        order = list(workers)
        for index in range(args.rounds):
            for name in order if index % 2 == 0 else order[::-1]:
                alone[name].append(timed(workers[name]))
        shared = {name: [side_by_side(workers[name], twin) for _ in range(args.rounds)]
                  for name, twin in twins.items()}
    finally:
        for worker in [*workers.values(), *twins.values()]:
            worker.close()

    def paired(numerator: str, denominator: str) -> float:
        return statistics.median(a / b for a, b in zip(alone[numerator], alone[denominator]))

    print(f"digits step, {args.threads} threads, {args.rounds} rounds, spinning = GOMP_SPINCOUNT {args.spin}")
    print("| setting | median ms, alone | paired ratio | over |")
    print("|---|---|---|---|")
    reference = {"FM, spinning": "FM, PASSIVE",
                 "Self-Flow, PASSIVE, teacher inline": "Self-Flow, PASSIVE, teacher thread",
                 "Self-Flow, spinning, teacher thread": "Self-Flow, spinning, teacher inline",
                 "Self-Flow, spinning, teacher inline": "Self-Flow, PASSIVE, teacher thread"}
    for name, samples in alone.items():
        over = reference.get(name)
        ratio = f"{paired(name, over):.3f}" if over else "-"
        print(f"| {name} | {statistics.median(samples) * 1e3:.1f} | {ratio} | {over or '-'} |")
    for name, samples in shared.items():
        slowdown = statistics.median(samples) / statistics.median(alone[name])
        print(f"| {name}, side by side with a twin | {statistics.median(samples) * 1e3:.1f} | {slowdown:.2f} | "
              f"{name}, alone (ratio of medians) |")


if __name__ == "__main__":
    main()
