"""The "every modality learns" table: train each modality's FM and Self-Flow preset, one run at a time,
and report sample class accuracy, FD, the real-data floor, FD / floor and the wall time of each run.

    python bench/modalities.py                       # all six rows (about two hours on 2 CPU cores)
    python bench/modalities.py --only audio/fm.gin   # one row
    python bench/modalities.py --table-only          # re-read finished runs in --runs

Every row is `selfflow train --gin_file <preset> --run-dir <runs>/modalities-<name> --no-tracking`;
its numbers are the last `<run-dir>/eval/metrics-step*.json` (the platform's own evaluation). Data
shards are built first when missing. The goal columns are issue 23's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# preset -> (dataset folder, goal class accuracy, goal FD / floor, goal wall seconds)
ROWS = {
    "audio/fm.gin": ("spoken_digits", 0.80, 5.0, 1800),
    "audio/selfflow.gin": ("spoken_digits", 0.80, 5.0, 1800),
    "video/fm.gin": ("moving_digits", 0.80, 5.0, 1800),
    "video/selfflow.gin": ("moving_digits", 0.80, 5.0, 1800),
    "digits/fm_5min.gin": ("digits", 0.95, 2.0, 300),
    "digits/selfflow_5min.gin": ("digits", 0.95, 2.0, 300),
}


def run_name(preset: str) -> str:
    return "modalities-" + preset.removesuffix(".gin").replace("/", "-")


def last_metrics(run_dir: Path) -> tuple[int, dict[str, float]] | None:
    files = sorted((run_dir / "eval").glob("metrics-step*.json"))
    if not files:
        return None
    content = json.loads(files[-1].read_text())
    return int(content["step"]), content["metrics"]


def train(preset: str, runs: Path, selfflow: str) -> float:
    dataset = ROWS[preset][0]
    if not (Path("data") / dataset / "train.index.json").is_file():
        subprocess.run([selfflow, "data", dataset], check=True)
    run_dir = runs / run_name(preset)
    started = time.perf_counter()
    subprocess.run([selfflow, "train", "--gin_file", preset, "--run-dir", str(run_dir), "--no-tracking", "--quiet"],
                   check=True)
    wall = time.perf_counter() - started
    (run_dir / "wall_seconds.txt").write_text(f"{wall:.1f}\n")
    return wall


def evaluation_seconds(run_dir: Path) -> float:
    """Wall time of every evaluation of the run (evaluator fit included), from its metrics files."""
    total = 0.0
    for path in (run_dir / "eval").glob("metrics-step*.json"):
        metrics = json.loads(path.read_text())["metrics"]
        total += float(metrics.get("timing/eval/seconds", metrics.get("eval/seconds", 0.0)))
    return total


def table(presets: list[str], runs: Path) -> str:
    """Training time = the whole command's wall time minus its evaluations': the goal's time column."""
    lines = ["| preset | steps | sample class acc | FD | floor | FD / floor | wall s | evaluation s | training s "
             "| goal met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for preset in presets:
        run_dir = runs / run_name(preset)
        found = last_metrics(run_dir)
        if found is None:
            lines.append(f"| `{preset}` | not run | | | | | | | | |")
            continue
        step, metrics = found
        wall_file = run_dir / "wall_seconds.txt"
        wall = float(wall_file.read_text()) if wall_file.is_file() else float("nan")
        accuracy, fd, floor = metrics["eval/sample_class_acc"], metrics["eval/fd"], metrics["eval/fd_data_floor"]
        _, goal_acc, goal_ratio, goal_wall = ROWS[preset]
        evaluation = evaluation_seconds(run_dir)
        training = wall - evaluation
        met = accuracy >= goal_acc and fd / floor <= goal_ratio and training <= goal_wall
        lines.append(f"| `{preset}` | {step} | {accuracy:.3f} | {fd:.1f} | {floor:.1f} | {fd / floor:.2f} | "
                     f"{wall:.0f} | {evaluation:.0f} | {training:.0f} | {'yes' if met else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="folder of the run folders")
    parser.add_argument("--only", action="append", default=[], choices=sorted(ROWS), help="preset (repeatable)")
    parser.add_argument("--table-only", action="store_true", help="do not train: tabulate finished runs")
    args = parser.parse_args(argv)
    presets = args.only or list(ROWS)
    runs = Path(args.runs)
    selfflow = str(Path(sys.executable).with_name("selfflow"))
    if not args.table_only:
        for preset in presets:
            print(f"{preset}: {train(preset, runs, selfflow):.0f} s", flush=True)
    print(table(presets, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
