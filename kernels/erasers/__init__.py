"""Concept erasers: remove a concept from a text-to-image model, keep the rest.

Every eraser produces a `ModelPatch` (kernels.patching), applied to the shared model only while
a sampler or text encoder runs; erasers chained in a graph compose. One technique per module,
each with its paper and the sources it was checked against:

- patches: the weight-change patches (WeightDeltaPatch, LoraPatch) and the layers they change;
- closed_form: Diff-QuickFix (text encoder) and UCE/TIME (cross-attention) edits;
- pruning: switching off the concept's UNet feed-forward (or cross-attention value) neurons;
- finetune: ESD / All-but-One / SPM LoRA training, one loss function per objective;
- membrane: SPM's membrane, whose strength follows the prompt;
- guidance: safe guidance, negative guidance at inference (a baseline);
- red_team: Prompting4Debugging, prompts that bring an erased concept back;
- generator: a MODEL + CLIP pair that samples with its patches (red team, benches);
- preserve: the default preserve prompts, from the model's vocabulary;
- files: saving and loading erasers.
"""

from .closed_form import (
                          QUICKFIX_TEMPLATES,
                          closed_form_weight,
                          fill_template,
                          last_token_index,
                          quickfix_edit,
                          uce_edit,
)
from .files import FORMAT, PATCH_KINDS, EraserFileError, default_eraser_dir, load_erasers, save_erasers
from .finetune import (
                          OBJECTIVES,
                          LossTerm,
                          TrainingBatch,
                          TrainingPools,
                          TrainReport,
                          all_but_one_loss,
                          anchoring_loss,
                          concept_trajectories,
                          esd_loss,
                          objective_loss,
                          spm_loss,
                          squared_error,
                          train_erasure_lora,
)
from .generator import Generator, model_scheduler
from .guidance import SafeGuidancePatch
from .membrane import MembranePatch, transport_strength
from .model_io import encode_embeds, predict_noise
from .patches import (
                          LAYER_SCOPES,
                          EraserPatch,
                          LoraPatch,
                          WeightDeltaPatch,
                          cross_attention_kv,
                          lora_delta,
                          lora_targets,
                          text_encoder_out_proj,
)
from .preserve import (
    common_concepts,
    default_preserve,
    default_templates,
    is_shapes_world,
    world_prompts,
    world_templates,
)
from .pruning import (
                          PRUNE_SITES,
                          concept_neuron_scores,
                          cross_attention_output_layers,
                          ffn_activations,
                          ffn_output_layers,
                          neuron_scores,
                          probe_timesteps,
                          prune_concept_neurons,
                          prune_layers,
                          pruned_count,
)
from .red_team import RedTeamResult, TokenVocabulary, red_team_prompt

__all__ = [
    "QUICKFIX_TEMPLATES", "closed_form_weight", "fill_template", "last_token_index", "quickfix_edit", "uce_edit",
    "FORMAT", "PATCH_KINDS", "EraserFileError", "default_eraser_dir", "load_erasers", "save_erasers",
    "OBJECTIVES", "LossTerm", "TrainingBatch", "TrainingPools", "TrainReport", "all_but_one_loss",
    "anchoring_loss", "concept_trajectories", "esd_loss", "objective_loss", "spm_loss", "squared_error",
    "train_erasure_lora", "Generator", "model_scheduler", "SafeGuidancePatch", "MembranePatch",
    "transport_strength", "encode_embeds", "predict_noise", "LAYER_SCOPES", "EraserPatch", "LoraPatch",
    "WeightDeltaPatch", "cross_attention_kv", "lora_delta", "lora_targets", "text_encoder_out_proj",
    "concept_neuron_scores", "ffn_activations", "ffn_output_layers", "neuron_scores", "probe_timesteps",
    "prune_concept_neurons", "pruned_count", "PRUNE_SITES", "cross_attention_output_layers", "prune_layers", "common_concepts", "default_preserve", "default_templates", "is_shapes_world", "world_prompts",
    "world_templates", "RedTeamResult", "TokenVocabulary", "red_team_prompt",
]
