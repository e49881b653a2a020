"""DeepSpeed's pipeline classes, imported once DeepSpeed's accelerator is fixed.

DeepSpeed picks its accelerator on its first import and never again; tools
that use its code without starting a runtime (export, generation,
resharding) import it through here, so it gets this process's decision
(`parallel.runtime`) instead of a guess and a warning on stdout.
"""

from parallel.runtime import export_deepspeed_accelerator

export_deepspeed_accelerator()

from deepspeed.pipe import LayerSpec, PipelineModule  # noqa: E402

__all__ = ["LayerSpec", "PipelineModule"]
