"""Writing a perturbed model as a standard transformers checkpoint (`hierui prune --save DIR`).

The result loads with `from_pretrained(DIR)` and with `--prune checkpoint:DIR`.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import HieruiError


def save_checkpoint(pair, directory: Path) -> Path:
    spec = pair.spec
    if spec.family == "quant":
        raise HieruiError(f"{spec} models are quantized on the fly and not saved; use --prune {spec} directly")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = pair.perturbed
    if spec.family == "drop":
        from engine.perturb.drop import standard_equivalent

        model = standard_equivalent(pair.dense, pair.perturbed, pair.report.details)
    model.save_pretrained(str(directory), safe_serialization=True)
    pair.tokenizer.save_pretrained(str(directory))
    report = pair.report.to_dict() if pair.report is not None else {}
    (directory / "hierui-perturbation.json").write_text(json.dumps(report, indent=1, default=str))
    return directory
