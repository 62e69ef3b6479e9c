"""Small models in the real diffusers formats: one builder for the tiny test pipelines and the digits bases.

- `components`: each component (CLIP and T5 text encoders, VAE, UNet, SD3 and Flux transformers,
  schedulers) as one function with size parameters; the tokenizers are `xdpo.models.tokenizer`'s.
- `pipelines`: `build_pipeline(pipeline_class, out_dir, **options)`, a tiny random-weight pipeline per
  family assembled from the components (a table keyed by the family's pipeline class), and `build_all`.
The digits bases (`xdpo.apps.digits.base`, `flow_base`) call the components with their own sizes.
"""

from xdpo.models.small.pipelines import ASSEMBLERS, build_all, build_pipeline, resolution

__all__ = ["ASSEMBLERS", "build_all", "build_pipeline", "resolution"]
