"""Training steps in separate, persistent processes, so settings that only take effect at process
start (environment variables such as glibc's allocator tunables) can be compared interleaved.

    worker = StepWorker(config, env={"OMP_WAIT_POLICY": None})   # None: unset in the child
    worker()        # one training step in the child; returns when it is done
    worker.close()

Each worker builds the config's Trainer once; a call sends one line and waits for the reply,
so `bench_core.interleaved` can alternate workers exactly like in-process variants.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from typing import Mapping

from bench.workloads import BenchConfig

_CHILD = r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[2]))
from bench import workloads as setup
fields = json.loads(sys.argv[1])
fields["data_shape"] = tuple(fields["data_shape"]); fields["extra"] = tuple(fields["extra"])
config = setup.BenchConfig(**fields)
trainer = setup.build_trainer(config, scratch=sys.argv[3])
raw = setup.synthetic_batch(config)
print("READY", flush=True)
for line in sys.stdin:
    if line.strip() == "quit":
        from bench.core import peak_rss_mb
        print("PEAK", peak_rss_mb(), flush=True)
        break
    trainer.train_step(raw)
    print("DONE", flush=True)
"""


def child_environment(env: Mapping[str, str | None] | None) -> dict[str, str]:
    """This process's environment with `env` on top; a None value removes the variable."""
    child_env = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            child_env.pop(name, None)
        else:
            child_env[name] = value
    return child_env


class StepWorker:
    """A child process holding one config's Trainer; calling it runs one training step there."""

    def __init__(self, config: BenchConfig, env: Mapping[str, str | None] | None = None, threads: int = 1,
                 scratch: str = "runs/.cache/bench/scratch"):
        """env: variables to set in the child on top of this process's; None removes one."""
        child_env = child_environment(env)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(asdict(config)), str(threads), str(scratch)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env,
        )
        self._expect("READY")

    def _expect(self, word: str) -> None:
        line = self.process.stdout.readline()
        if line.strip() != word:
            self.close()
            error = self.process.stderr.read().strip().splitlines()
            raise RuntimeError(f"step worker failed: {error[-1] if error else 'no output'}")

    def __call__(self) -> None:
        self.send_step()
        self.wait_step()

    def send_step(self) -> None:
        """Starts one step in the child without waiting (wait_step waits): children can step at once."""
        self.process.stdin.write("step\n")
        self.process.stdin.flush()

    def wait_step(self) -> None:
        self._expect("DONE")

    def close(self) -> float | None:
        """Stop the child; returns its peak RSS in MiB when it reported one."""
        peak = None
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
                words = self.process.stdout.readline().split()
                if len(words) == 2 and words[0] == "PEAK":
                    peak = float(words[1])
                self.process.wait(timeout=30)
            except (BrokenPipeError, OSError, ValueError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        return peak

    def __enter__(self) -> "StepWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_ROUND_CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
from bench import workloads as setup
configs = []
for fields in json.loads(sys.argv[1]):
    fields["data_shape"] = tuple(fields["data_shape"]); fields["extra"] = tuple(fields["extra"])
    configs.append(setup.BenchConfig(**fields))
trainers = [setup.build_trainer(config, scratch=sys.argv[3]) for config in configs]
raws = [setup.synthetic_batch(config) for config in configs]
print("READY", flush=True)
for number, line in enumerate(sys.stdin):
    if line.strip() == "quit":
        break
    order = list(range(len(trainers)))
    if number % 2:
        order.reverse()
    seconds = [0.0] * len(trainers)
    for index in order:
        start = time.perf_counter()
        trainers[index].train_step(raws[index])
        seconds[index] = time.perf_counter() - start
    print(json.dumps(seconds), flush=True)
"""


class RoundWorker:
    """A child process holding several configs' Trainers; a call runs one step of each, interleaved
    inside the child (the order reverses every round), and returns their seconds: variants compared
    in one process, the way a user's own measurement would, under the child's environment."""

    def __init__(self, configs: list[BenchConfig], env: Mapping[str, str | None] | None = None, threads: int = 1,
                 scratch: str = "runs/.cache/bench/scratch"):
        child_env = child_environment(env)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _ROUND_CHILD, json.dumps([asdict(c) for c in configs]), str(threads), str(scratch)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env,
        )
        if self.process.stdout.readline().strip() != "READY":
            self.close()
            error = self.process.stderr.read().strip().splitlines()
            raise RuntimeError(f"round worker failed: {error[-1] if error else 'no output'}")

    def __call__(self) -> list[float]:
        self.process.stdin.write("round\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
                self.process.wait(timeout=30)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
