"""What every benchmark does with a run: its JSON, and its plot where matplotlib is installed."""

from __future__ import annotations

import json
import os


def save_run(out_dir: str, name: str, data, draw) -> None:
    """``data`` into ``out_dir/name.json``; then ``draw()``, which the GPU image cannot (no
    matplotlib): ``--replot DIR`` draws the JSON elsewhere."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)
    try:
        draw()
    except ImportError:
        print("matplotlib missing: no plot (draw it elsewhere with --replot)", flush=True)


def replot(run_dir: str, name: str, plot) -> None:
    """``plot(data, path)`` of a saved run: ``run_dir/name.json`` drawn to ``run_dir/name.png``."""
    with open(os.path.join(run_dir, f"{name}.json")) as f:
        plot(json.load(f), os.path.join(run_dir, f"{name}.png"))
