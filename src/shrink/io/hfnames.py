"""How Hugging Face checkpoints name tensors, where that differs from the modules transformers builds.

transformers 5 renames some checkpoints' tensors on loading (Mixtral's `block_sparse_moe.` becomes `mlp.`)
and stacks a mixture's experts, stored one tensor per expert and projection (`experts.3.w1.weight`), into
fused 3-D parameters. Its own table (`conversion_mapping`) says how, per model type; shrink reads it rather
than keeping its own, to read such checkpoints block by block and to write its compressed-tensors folders
under the names the original checkpoint had, which transformers, vLLM and llm-compressor all read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_PLAIN = re.compile(r"[\w.]+")  # a name's text: letters, digits, underscores and dots


@dataclass(frozen=True)
class CheckpointNames:
    """A model type's checkpoint naming. renamings: (regex, replacement) from the stored name to the
    module's, applied in turn; leaves: the per-expert tensor names of fused experts stored one tensor per
    expert, {"gate_up": [gate, up], "down": [down]} (e.g. Mixtral's ["w1.weight", "w3.weight"], ["w2.weight"]),
    empty when the model type has none."""

    renamings: list[tuple[str, str]] = field(default_factory=list)
    leaves: dict[str, list[str]] = field(default_factory=dict)

    def loaded(self, name: str) -> str:
        """The name transformers gives the stored tensor `name` (as its loading renames it)."""
        for pattern, replacement in self.renamings:
            name = re.sub(pattern, replacement, name)
        return name

    def stored(self, name: str) -> str:
        """The name the original checkpoint gives the module's tensor `name`: the renamings undone, last
        first, where both sides are plain names (other patterns are left alone), kept only if loading gives
        `name` back (otherwise `name` itself, which transformers loads too)."""
        out = name
        for pattern, replacement in reversed(self.renamings):
            source = pattern.replace("\\.", ".")
            if _PLAIN.fullmatch(source) and _PLAIN.fullmatch(replacement):
                out = out.replace(replacement, source)
        return out if self.loaded(out) == name else name

    @property
    def per_expert(self) -> bool:
        """Whether fused experts have per-expert names (gate, up and down leaves)."""
        return len(self.leaves.get("gate_up", [])) == 2 and len(self.leaves.get("down", [])) == 1


def checkpoint_names(model_type: str | None) -> CheckpointNames:
    """The checkpoint naming of `model_type`, from transformers' conversion table (CheckpointNames() when
    transformers has none, or no table)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        mapping = get_checkpoint_conversion_mapping(model_type) or []
    except Exception:  # a transformers without the table: names as the modules have them
        return CheckpointNames()
    renamings, leaves = [], {}
    for op in mapping:
        sources, targets = list(getattr(op, "source_patterns", [])), list(getattr(op, "target_patterns", []))
        if isinstance(op, WeightRenaming) and len(sources) == len(targets) == 1:
            renamings.append((sources[0], targets[0]))
        elif isinstance(op, WeightConverter) and len(targets) == 1 and all(".*." in p for p in sources):
            per = [p.split(".*.", 1)[1] for p in sources]
            if targets[0].endswith(".gate_up_proj") and len(per) == 2:
                leaves["gate_up"] = per
            elif targets[0].endswith(".down_proj") and len(per) == 1:
                leaves["down"] = per
    return CheckpointNames(renamings, leaves)
