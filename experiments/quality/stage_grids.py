"""The README's picture: each stage's last fixed-latent sample grid of a run, side by side, each shown at 256 px.

    python experiments/quality/stage_grids.py RUN_DIR OUT.png

The grids are the run's own samples/fakes-stage-<res>-<kimg>kimg.png (G_ema, the same 16 latents all run long);
smaller stages are enlarged with nearest-neighbour so their pixels stay visible.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from PIL import Image, ImageDraw

PANEL_PX = 256  # each stage's grid is shown at this size
LABEL_PX = 18


def last_grid_per_stage(run_dir: Path) -> dict[int, Path]:
    """Resolution -> the stage's last sample grid."""
    grids: dict[int, tuple[float, Path]] = {}
    for path in (run_dir / "samples").glob("fakes-stage-*kimg.png"):
        match = re.fullmatch(r"fakes-stage-(\d+)-([\d.]+)kimg\.png", path.name)
        if match:
            resolution, kimg = int(match[1]), float(match[2])
            if resolution not in grids or kimg > grids[resolution][0]:
                grids[resolution] = (kimg, path)
    return {r: grids[r][1] for r in sorted(grids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    grids = last_grid_per_stage(args.run_dir)
    if not grids:
        raise SystemExit(f"error: no sample grids in {args.run_dir / 'samples'}")
    gap = 6
    sheet = Image.new("RGB", (len(grids) * (PANEL_PX + gap) - gap, PANEL_PX + LABEL_PX), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (resolution, path) in enumerate(grids.items()):
        panel = Image.open(path).convert("RGB").resize((PANEL_PX, PANEL_PX), Image.Resampling.NEAREST)
        x = i * (PANEL_PX + gap)
        sheet.paste(panel, (x, LABEL_PX))
        draw.text((x + 2, 2), f"{resolution} px", fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"{args.out}: {', '.join(f'{r} px' for r in grids)}")


if __name__ == "__main__":
    main()
