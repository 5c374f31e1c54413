"""What every diffusers-pipeline policy shares: LoRA or full fine-tuning, the reference
model for the KL term, and saving/loading adapters in diffusers' format. Backends
(sd3.py, flux.py) add only what differs: prompt encoding, latent layout, sigmas, velocity."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from .base import adapters_disabled


class DiffusersPolicy:
    lora_targets: list[str] = []
    pipeline_class_name: str = ""  # the diffusers pipeline this backend wraps
    default_max_sequence_length: int = 256
    text_encoder_attrs: tuple[str, ...] = ()  # the pipeline's text encoders, frozen at load
    block_attrs: tuple[str, ...] = ("transformer_blocks",)  # the transformer's block lists (FSDP2 units)

    @classmethod
    def from_pretrained(cls, model: str, dtype: torch.dtype = torch.float32, device="cpu",
                        max_sequence_length: int | None = None, shift: float | None = None,
                        embedding_cache: str | None = None, cpu_offload: bool = False, **kwargs):
        """Load a hub id or diffusers folder. With `embedding_cache` (a `flowgrpo preprocess`
        folder) the text encoders are not loaded at all."""
        import diffusers

        from .flux import place_pipeline
        from .sd3 import load_pipeline, model_defaults

        defaults = model_defaults(model)
        encoder = None
        if embedding_cache:
            from .cache import TEXT_COMPONENTS, CachedEncoder

            encoder = CachedEncoder(embedding_cache)
            max_sequence_length = max_sequence_length or encoder.max_sequence_length
            encoder.check(model, max_sequence_length)
            kwargs.update({name: None for name in TEXT_COMPONENTS[cls.pipeline_class_name]})
        msl = max_sequence_length or defaults.get("max_sequence_length", cls.default_max_sequence_length)
        pipe = load_pipeline(getattr(diffusers, cls.pipeline_class_name), model, dtype, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        dev = place_pipeline(pipe, device, cpu_offload)
        policy = cls(pipe, msl, dev, shift, encoder, defaults)
        if encoder is not None:
            encoder.check_dims(policy.condition_dims())
        return policy

    # the published sampling settings (resolution, guidance, steps, max_sequence_length); the
    # folder's flowgrpo_defaults.json overrides them
    published_defaults: dict = {}

    def __init__(self, pipe, max_sequence_length: int | None = None, device: str | torch.device = "cpu",
                 shift: float | None = None, encoder=None, defaults: dict | None = None) -> None:
        max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.max_sequence_length = max_sequence_length
        self.shift = shift  # None: the scheduler's own shift
        self.encoder = encoder  # a cache.CachedEncoder, used instead of the text encoders when set
        self.defaults = ({**self.published_defaults, "max_sequence_length": max_sequence_length, **(defaults or {})}
                         if self.published_defaults else dict(defaults or {}))
        self.pipe = pipe
        self.device = torch.device(device)
        self.transformer = pipe.transformer
        self.dtype = self.transformer.dtype
        self.forward_module: torch.nn.Module = self.transformer  # the trainer may swap in a DDP wrapper
        self._reference_module: torch.nn.Module | None = None
        self.lora = None
        for m in (pipe.vae, *(getattr(pipe, name, None) for name in self.text_encoder_attrs)):
            if m is not None:
                m.requires_grad_(False).eval()
        self.transformer.requires_grad_(False)

    # ---- the protocol: what most backends share -------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def default_resolution(self) -> int:
        return int(self.defaults["resolution"])

    def sample_defaults(self) -> dict:
        """resolution, guidance, steps and max_sequence_length for `flowgrpo sample`."""
        return dict(self.defaults)

    def sampling_scheduler(self):
        """A copy of the pipeline's scheduler; with `model.shift` set, that fixed shift instead of its own."""
        sched = self.pipe.scheduler
        if self.shift is not None:
            return type(sched).from_config(sched.config, shift=float(self.shift), use_dynamic_shifting=False)
        return copy.deepcopy(sched)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]):
        if self.encoder is not None:
            return self.encoder(prompts, device=self.device)
        from .cache import encode_text

        return encode_text(self.pipe, prompts, self.max_sequence_length, self.device)

    # ---- training set-up -------------------------------------------------------------
    def add_lora(self, spec) -> None:
        from peft import LoraConfig

        self.lora = spec
        # "kaiming" (or true) is peft's default init, Kaiming-uniform A; other names pass through
        init = True if str(spec.init).lower() in ("kaiming", "true") else spec.init
        cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights=init,
                         target_modules=spec.targets or self.lora_targets, lora_dropout=spec.dropout)
        self.transformer.add_adapter(cfg)

    def enable_full_finetune(self, keep_reference: bool) -> None:
        if keep_reference:
            self._reference_module = copy.deepcopy(self.transformer).requires_grad_(False).eval()
        self.transformer.requires_grad_(True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def shard_units(self, module: torch.nn.Module | None = None) -> list[torch.nn.Module]:
        """The transformer's blocks, each one FSDP2 unit (`module`: a copy of the transformer, e.g.
        the frozen reference of full fine-tuning)."""
        module = self.transformer if module is None else module
        return [block for attr in self.block_attrs for block in getattr(module, attr)]

    def shard(self, **options) -> None:
        """Shard the transformer (and the reference copy of full fine-tuning) with FSDP2."""
        from ..parallel import shard_module

        for module in (self.transformer, self._reference_module):
            if module is not None:
                shard_module(module, self.shard_units(module), compute_dtype=self.dtype, **options)
        self.forward_module = self.transformer

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    @contextlib.contextmanager
    def reference(self):
        """The frozen base model: LoRA disabled, or the kept copy under full fine-tuning."""
        if self.lora is not None:
            with adapters_disabled(self.transformer):
                yield
        elif self._reference_module is not None:
            active = self.forward_module
            self.forward_module = self._reference_module
            try:
                yield
            finally:
                self.forward_module = active
        else:
            raise RuntimeError("no reference model: full fine-tuning was set up without keep_reference "
                               "(set optim.kl_beta > 0 to keep one)")

    @contextlib.contextmanager
    def folded_adapters(self):
        """Gradient-free forwards with each active LoRA folded into its layer, W + scaling B A: one
        matmul a layer instead of three, about 1.5x faster a forward on a CPU (docs/performance.md).
        The layers' own weight tensors are put back untouched on exit, so nothing drifts however
        often it runs; the outputs equal the adapted model's up to float rounding. Without a LoRA,
        with adapters switched off (the reference), or with a LoRA that cannot fold exactly (DoRA,
        LoRA biases, weights already merged, sharded weights), the model runs as it is."""
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.transformer.modules() if isinstance(m, LoraLayer)]
        foldable = bool(layers) and not any(
            m.disable_adapters or m.merged or any(m.use_dora.values()) or any(getattr(m, "lora_bias", {}).values())
            or type(m.get_base_layer().weight).__name__ == "DTensor" for m in layers)
        if not foldable:
            with torch.no_grad():
                yield
            return
        kept, disabled = [], False
        try:
            with torch.no_grad():
                for m in layers:
                    active = [a for a in m.active_adapters if a in m.lora_A]
                    if active:
                        w = m.get_base_layer().weight
                        kept.append((w, w.data))
                        w.data = w.data + sum(m.get_delta_weight(a) for a in active).to(w.dtype)
                self.transformer.disable_adapters()
                disabled = True
                yield
        finally:
            for w, data in kept:
                w.data = data
            if disabled:
                self.transformer.enable_adapters()

    # ---- adapters ----------------------------------------------------------------------
    def load_lora(self, folder: str | Path, scale: float = 1.0) -> None:
        """Apply a saved LoRA (ours or any diffusers-format LoRA for this pipeline) for sampling.
        `scale` multiplies the strength the file holds: 1.0 is the trained model (flowgrpo folds
        alpha / r into the saved weights)."""
        from .sd3 import ModelLoadError

        folder = Path(folder)
        if not folder.exists():
            raise ModelLoadError(f"LoRA folder {str(folder)!r} does not exist")
        self.pipe.load_lora_weights(str(folder), adapter_name="loaded")
        self.pipe.set_adapters(["loaded"], [scale])

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter as it acts: each up-projection B multiplied by its layer's scaling
        (alpha / r, or alpha / sqrt(r) with rsLoRA). A diffusers LoRA file carries no alpha,
        and every loader (diffusers, flowgrpo, ComfyUI) then applies scale 1, so the file must
        hold scaling * B for a plain `load_lora_weights` to reproduce the trained model."""
        from peft.tuners.lora import LoraLayer
        from peft.utils import get_peft_model_state_dict

        state = dict(get_peft_model_state_dict(self.transformer))
        for name, module in self.transformer.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            for adapter, scaling in module.scaling.items():
                if getattr(module, "lora_magnitude_vector", None) and adapter in module.lora_magnitude_vector:
                    raise NotImplementedError("saving DoRA adapters is not supported: its scale cannot be folded")
                key = f"{name}.lora_B.weight"
                if key in state and scaling != 1.0:
                    state[key] = state[key] * scaling
        return state

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What `save_trained` writes: the LoRA as it acts, or the whole transformer's weights
        (sharded tensors under FSDP2: gather them with `parallel.gathered` on every process)."""
        return self.lora_state_dict() if self.lora is not None else dict(self.transformer.state_dict())

    def save_trained(self, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """LoRA: `pytorch_lora_weights.safetensors` that the pipeline's load_lora_weights reads;
        full fine-tuning: the transformer folder. `state`: the gathered `trained_state()` of a
        sharded model (the module itself then holds only this process's shards)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.lora is not None:
            type(self.pipe).save_lora_weights(folder, transformer_lora_layers=state or self.lora_state_dict())
        elif state is None:
            self.transformer.save_pretrained(folder / "transformer")
        else:
            from huggingface_hub import save_torch_state_dict

            out = folder / "transformer"
            self.transformer.save_config(out)
            # diffusers' own file names and index, so from_pretrained reads it as a saved model
            save_torch_state_dict(state, out, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                                  max_shard_size="10GB")
        return folder
