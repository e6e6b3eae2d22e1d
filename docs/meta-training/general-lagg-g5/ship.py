"""Write the shipped `lagg:pretrained/general`: g5's φ with correction_cap = 1.

    python docs/meta-training/general-lagg-g5/ship.py src/metagg/zoo/general-lagg

The cap (the learned correction at most the base step's RMS, per tensor) changes no
tensor of φ; it stops the late blow-up measured on held-out breast cancer (README).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from metagg.learned.lagg import load_lagg, save_lagg
from metagg.learned.lagg.aggregator import learned_ada
from metagg.learned.lagg.model import AdaMLP

HERE = Path(__file__).resolve().parent
CAP = 1.0

if __name__ == "__main__":
    out = Path(sys.argv[1])
    g5 = load_lagg(HERE)
    meta = json.loads((HERE / "aggregator.json").read_text())
    config = dataclasses.replace(g5.config, correction_cap=CAP)
    net = AdaMLP(config)
    net.load_state_dict(g5.net.state_dict())
    trained_on = {**meta["trained_on"], "init_from": "docs/meta-training/general-lagg-g4",
                  "history": "g4: 2000 multi-task PES steps from local SGD + server Prodigy "
                             "(kept step 500, ~17 min); g5: 1000 more from there at lr 1e-3 "
                             "(kept step 500, 941 s); 1 thread of a 2-core CPU",
                  "meta_training_minutes": 33, "correction_cap": CAP}
    save_lagg(out, learned_ada(config, net), trained_on=trained_on,
              validation=meta["validation"])
    print(f"wrote {out}")
