"""DreamBooth-LoRA training of one concept on an SD 1.x / 2.x pipeline, as community LoRAs are made.

LoRA layers come from peft (``LoraConfig`` + ``inject_adapter_in_model``) on copies of the text encoder and
UNet; after training their factors are taken out into canonical :class:`~loraclr.lora.LoraLayer` objects
(lora_A -> down, lora_B -> up, alpha = lora_alpha), so any writer can save them. The pipeline passed in is
never modified.

Targets (``TrainConfig.targets``):
- ``"attn"``: text encoder self-attention q/k/v/out_proj; UNet attn1/attn2 to_q/to_k/to_v/to_out.0
  (Mix-of-Show's ED-LoRA and diffusers' DreamBooth-LoRA script);
- ``"kohya"``: everything kohya's default network targets (adds ff, proj_in/proj_out and the text MLPs).

Learned tokens (optional):
- ED-LoRA (``layerwise=True``): each new token has one embedding per UNet cross-attention layer; the prompt is
  encoded once per layer with that layer's embedding and cross-attention layer l gets its own states, as
  Mix-of-Show's EDLoRA trains them;
- textual-inversion style (``layerwise=False``): one embedding per token, trained with the LoRA (pivotal
  tuning) and saved beside it.
``token_warmup`` > 0 trains the learned tokens alone for that many steps before the LoRA factors join (their
learning-rate warm-up starts then): the tokens take as much of the identity as they can, and the LoRA learns the
rest. A merge keeps every concept's tokens exactly, so identity held there survives merging many concepts.
New tokens get ids after the base vocabulary; the base embedding table is never touched.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loraclr.lora import LearnedToken, LoraLayer, LoraSet
from loraclr.runtime import choose_precision, cpu_has_native_bf16
from loraclr.training.data import ConceptData

log = logging.getLogger(__name__)

_ATTN_UNET = ("to_q", "to_k", "to_v", "to_out.0")
_ATTN_TEXT = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one concept LoRA. Learning rates are AdamW's; ``alpha / rank`` scales the delta."""

    rank: int = 4
    alpha: float = 4.0
    targets: str = "attn"  # "attn" | "kohya"
    train_text_encoder: bool = True
    steps: int = 300
    batch: int = 8
    prior_batch: int = 4  # prior-preservation images per step (0 = off, or no prior data)
    prior_weight: float = 1.0
    lr: float = 1e-3  # UNet LoRA
    text_lr: float = 5e-4  # text-encoder LoRA
    embedding_lr: float = 5e-3  # learned tokens
    weight_decay: float = 1e-2
    warmup: int = 20
    token_warmup: int = 0  # the first steps train the learned tokens only (textual inversion), then all
    tokens: tuple[str, ...] = ()  # learned token names, e.g. ("<rubo1>", "<rubo2>")
    layerwise: bool = False  # ED-LoRA layer-wise tokens (one embedding per cross-attention layer)
    init_word: str = "creature"  # learned tokens start from this word's embedding
    seed: int = 0
    # bf16 autocast for the model forward (fp32 master weights and loss); None: where the training device computes
    # bf16 natively (loraclr.runtime.choose_precision), since emulated bf16 is many times slower than fp32
    autocast: bool | None = None

    def __post_init__(self) -> None:
        if self.targets not in ("attn", "kohya"):
            raise ValueError(f"targets={self.targets!r}: use 'attn' or 'kohya'")
        if self.rank < 1 or self.steps < 1 or self.batch < 1:
            raise ValueError(f"rank, steps and batch must be positive (got {self.rank}, {self.steps}, {self.batch})")
        if self.layerwise and not self.tokens:
            raise ValueError("layer-wise (ED-LoRA) training needs at least one learned token name")
        if self.token_warmup and not self.tokens:
            raise ValueError("token_warmup trains learned tokens first: give at least one learned token name")
        if not 0 <= self.token_warmup < self.steps:
            raise ValueError(f"token_warmup={self.token_warmup}: must be >= 0 and below steps={self.steps}")


@dataclass
class TrainResult:
    layers: dict[str, LoraLayer]  # canonical key -> trained factors (fp32)
    tokens: list[LearnedToken]
    losses: list[float]  # per step (instance + weighted prior)
    seconds: float
    config: TrainConfig
    n_images: int
    n_prior: int
    captions: list[str] = field(default_factory=list)

    @property
    def steps_per_second(self) -> float:
        return len(self.losses) / self.seconds if self.seconds > 0 else float("nan")

    def lora_set(self, family: str = "sd1") -> LoraSet:
        """The trained LoRA in canonical form, as a reader would return it from a saved file."""
        return LoraSet(layers=dict(self.layers), tokens=list(self.tokens), format="trained", family=family,
                       metadata={"loraclr.training": repr(self.config)})


# --- target selection ---------------------------------------------------------------------------------------


def lora_targets(pipe, targets: str = "attn", text_encoder: bool = True) -> dict[str, tuple[str, str]]:
    """canonical key -> (component, live module name) of the modules a LoRA is trained on."""
    from loraclr.models import default_lora_targets

    comps = {"unet": pipe.unet}
    if text_encoder:
        comps["text_encoder"] = pipe.text_encoder
    chosen = default_lora_targets(comps)
    live: dict[int, tuple[str, str]] = {}
    for comp, model in comps.items():
        for name, mod in model.named_modules():
            live[id(mod)] = (comp, name)
    out = {}
    for key, mod in chosen.items():
        comp, name = live[id(mod)]
        if targets == "attn":
            if comp == "unet":
                keep = any(name.endswith(f".{a}.{m}") for a in ("attn1", "attn2") for m in _ATTN_UNET)
            else:
                keep = name.rsplit(".", 1)[-1] in _ATTN_TEXT
            if not keep:
                continue
        out[key] = (comp, name)
    if not out:
        raise ValueError(f"no LoRA target modules found for targets={targets!r}")
    return out


# --- learned tokens -------------------------------------------------------------------------------------------


class _ExtendedEmbedding(nn.Module):
    """The base token embedding plus trainable rows for ids >= the base vocabulary size."""

    def __init__(self, base: nn.Embedding, extra: nn.Parameter):
        super().__init__()
        self.base = base
        self.extra = extra  # (n_extra, dim)

    def forward(self, ids: Tensor) -> Tensor:
        vocab = self.base.num_embeddings
        new = ids >= vocab
        out = self.base(ids.masked_fill(new, 0))
        if bool(new.any()):
            extra = self.extra[(ids - vocab).clamp(min=0)].to(out.dtype)
            out = torch.where(new[..., None], extra, out)
        return out


def _layer_ids(ids: Tensor, vocab: int, n_layers: int, layer: int) -> Tensor:
    """Token k's id ``vocab + k`` -> its layer-``layer`` row ``vocab + k * n_layers + layer``."""
    return torch.where(ids >= vocab, vocab + (ids - vocab) * n_layers + layer, ids)


# --- the trainer ----------------------------------------------------------------------------------------------


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> cpu; ``"cuda"`` -> ``cuda`` (checked to be available)."""
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for but torch sees no CUDA device")
    return dev


def _encode_images(vae, images: np.ndarray, chunk: int = 64) -> Tensor:
    """uint8 images -> latents (posterior mean x scaling factor), fp32, no grad, on the CPU (the VAE may be on
    any device: the images are sent to its device)."""
    scale = float(getattr(vae.config, "scaling_factor", 1.0))
    dev = _module_device(vae)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), chunk):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + chunk])).permute(0, 3, 1, 2).float()
            x = x / 127.5 - 1.0
            out.append(vae.encode(x.to(device=dev, dtype=vae.dtype)).latent_dist.mean.float().cpu() * scale)
    return torch.cat(out)


def _tokenize(tokenizer, captions: list[str]) -> Tensor:
    # exactly as StableDiffusionPipeline.encode_prompt: padded to the model length, truncated
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _check_resolution(pipe, images: np.ndarray, source: str) -> None:
    side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    if images.shape[1:3] != (side, side):
        raise ValueError(f"{source}: images are {images.shape[1]}x{images.shape[2]} but the model draws "
                         f"{side}x{side}; resize them (folder_data does)")


def train_lora(pipe, data: ConceptData, config: TrainConfig = TrainConfig(), *,
               callback: Callable[[int, float], None] | None = None, log_every: int = 50,
               device: str | torch.device | None = None, snapshots: Iterable[int] = (),
               on_snapshot: Callable[[TrainResult], None] | None = None) -> TrainResult:
    """Train a concept LoRA (and learned tokens if ``config.tokens``) on ``data``; ``pipe`` is left as it was.

    Loss: epsilon- (or v-) prediction MSE on the concept's images, plus ``prior_weight`` x the same on prior
    images with their own captions (DreamBooth's prior preservation) when ``data`` has them.

    ``device``: where the copies of the UNet and text encoder train (default cpu; e.g. ``"cuda"``). The
    latents are encoded by ``pipe.vae`` where it is, and every random draw (batch rows, noise, timesteps) is
    made on the CPU from the seeded generator and then moved, so a run draws the same batches on any device.
    The result's layers and tokens are always CPU tensors.

    ``snapshots``: step counts (1 .. steps - 1) after which ``on_snapshot`` gets the run so far as a
    :class:`TrainResult` whose config says that many steps (as kohya's ``--save_every_n_steps``). The learning
    rate is constant after its warm-up, so a snapshot after k steps holds what a k-step run of the same seed
    would have trained; one run gives every shorter candidate.
    """
    from diffusers import DDPMScheduler
    from peft import LoraConfig, inject_adapter_in_model

    from loraclr.surgery.hooks import cross_attention_modules, layerwise_states

    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError("training LoRAs for SDXL pipelines is not supported yet (SD 1.x / 2.x only)")
    _check_resolution(pipe, data.images, data.description)
    cfg = config
    snapshots = {int(k) for k in snapshots}
    if snapshots and on_snapshot is None:
        raise ValueError("snapshots given without on_snapshot: nothing would receive them")
    bad = [k for k in sorted(snapshots) if not cfg.token_warmup < k < cfg.steps]
    if bad:
        raise ValueError(f"snapshots {bad}: each must be above token_warmup={cfg.token_warmup} (the LoRA trains "
                         f"from there) and below steps={cfg.steps} (the run's own result)")
    dev = resolve_device(device)
    if cfg.autocast is None:  # the result's config (and the file's record) says what ran
        cfg = dataclasses.replace(cfg, autocast=choose_precision(None, dev) == torch.bfloat16)
    elif cfg.autocast and dev.type == "cpu" and not cpu_has_native_bf16():
        log.warning("bf16 autocast on a CPU without AVX512-BF16 or AMX is emulated and many times slower than "
                    "fp32; train with autocast=False (CLI: --precision fp32)")
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    unet = copy.deepcopy(pipe.unet).float().requires_grad_(False)
    te = copy.deepcopy(pipe.text_encoder).float().requires_grad_(False)
    tokenizer = copy.deepcopy(pipe.tokenizer)
    vocab = te.get_input_embeddings().num_embeddings
    n_layers = len(cross_attention_modules(unet)) if cfg.layerwise else 1

    # data: latents once, captions tokenised (learned tokens become single ids >= vocab)
    latents = _encode_images(pipe.vae, data.images)  # (n, 4, h, w)
    use_prior = data.prior_images is not None and len(data.prior_images) > 0 and cfg.prior_batch > 0
    prior_latents = _encode_images(pipe.vae, data.prior_images) if use_prior else None
    extra = None
    if cfg.tokens:
        added = tokenizer.add_tokens(list(cfg.tokens), special_tokens=False)
        ids_new = tokenizer.convert_tokens_to_ids(list(cfg.tokens))
        if added != len(cfg.tokens) or ids_new != list(range(len(tokenizer) - added, len(tokenizer))) \
                or len(tokenizer) - added != vocab:
            raise ValueError(f"learned tokens {cfg.tokens}: already in the tokenizer or the tokenizer "
                             f"({len(tokenizer) - added}) and text encoder ({vocab}) vocabularies differ")
        missing = [t for t in cfg.tokens if not any(t in c for c in data.captions)]
        if missing:
            raise ValueError(f"{data.description}: no caption uses the learned token(s) {missing}")
        init_ids = pipe.tokenizer(cfg.init_word).input_ids[1:-1]
        with torch.no_grad():
            init = te.get_input_embeddings().weight[init_ids].mean(0)  # (dim,)
        extra = nn.Parameter(init.repeat(len(cfg.tokens) * n_layers, 1).clone())  # (k * n_layers, dim)
        te.set_input_embeddings(_ExtendedEmbedding(te.get_input_embeddings(), extra))
    ids = _tokenize(tokenizer, data.captions)  # (n, 77)
    prior_ids = _tokenize(tokenizer, data.prior_captions) if use_prior else None
    if not cfg.tokens and int(ids.max()) >= vocab:
        raise ValueError(f"{data.description}: captions tokenise to ids beyond the text encoder's vocabulary")

    # LoRA layers by peft, on the copies (initialised on the CPU, then the copies go to the device)
    targets = lora_targets(pipe, cfg.targets, cfg.train_text_encoder)
    models = {"unet": unet, "text_encoder": te}
    params: dict[str, list[nn.Parameter]] = {"unet": [], "text_encoder": []}
    for comp, model in models.items():
        names = [name for c, name in targets.values() if c == comp]
        if not names:
            continue
        lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=names, lora_dropout=0.0,
                          init_lora_weights=True, bias="none")
        inject_adapter_in_model(lcfg, model, adapter_name="default")
    for comp, model in models.items():
        model.to(dev)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_" in n:
                params[comp].append(p)
    if extra is not None:
        extra = te.get_input_embeddings().extra  # the same parameter, now on the device
        extra.requires_grad_(True)  # after the loop above, which froze everything that is not a LoRA factor
    # "start": the step a group begins to train (its lr warm-up counts from there); LoRA factors wait for
    # token_warmup steps (pivotal tuning: the tokens take what they can before the LoRA learns the rest)
    groups = [{"params": params["unet"], "lr": cfg.lr, "weight_decay": cfg.weight_decay, "start": cfg.token_warmup}]
    if params["text_encoder"]:
        groups.append({"params": params["text_encoder"], "lr": cfg.text_lr, "weight_decay": cfg.weight_decay,
                       "start": cfg.token_warmup})
    if extra is not None:
        groups.append({"params": [extra], "lr": cfg.embedding_lr, "weight_decay": 0.0, "start": 0})
    opt = torch.optim.AdamW(groups)
    base_lrs = [g["lr"] for g in opt.param_groups]
    lora_params = params["unet"] + params["text_encoder"]
    if cfg.token_warmup:
        for p in lora_params:  # no gradient, so AdamW neither moves them nor keeps moments for them yet
            p.requires_grad_(False)
    trainable = [p for g in groups for p in g["params"]]

    # text states are fixed when nothing in the text path trains: encode every caption once
    text_trains = bool(params["text_encoder"]) or extra is not None
    fixed_states = fixed_prior_states = None
    if not text_trains:  # kept on the device; rows are picked with indices moved there
        with torch.no_grad():
            fixed_states = torch.cat([te(ids[i:i + 64].to(dev))[0] for i in range(0, len(ids), 64)])
            if use_prior:
                fixed_prior_states = torch.cat([te(prior_ids[i:i + 64].to(dev))[0]
                                                for i in range(0, len(prior_ids), 64)])

    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    n_train_t = int(noise_sched.config.num_train_timesteps)
    prediction = noise_sched.config.prediction_type
    def result_now(run_cfg: TrainConfig) -> TrainResult:
        """The factors and tokens as they are now, on the CPU."""
        layers = {}
        for key, (comp, name) in targets.items():
            mod = models[comp].get_submodule(name)
            down = mod.lora_A["default"].weight.detach().float().cpu().clone()
            up = mod.lora_B["default"].weight.detach().float().cpu().clone()
            alpha = float(mod.scaling["default"] * cfg.rank)  # peft: scaling = lora_alpha / r
            layers[key] = LoraLayer(down=down, up=up, alpha=alpha)
        tokens = []
        if extra is not None:
            table = extra.detach().float().cpu().reshape(len(cfg.tokens), n_layers, -1)
            tokens = [LearnedToken(name, {"text_encoder": table[k].clone()}, layerwise=cfg.layerwise)
                      for k, name in enumerate(cfg.tokens)]
        return TrainResult(layers=layers, tokens=tokens, losses=list(losses), seconds=time.time() - t0,
                           config=run_cfg, n_images=len(latents),
                           n_prior=0 if prior_latents is None else len(prior_latents),
                           captions=list(data.captions[:5]))

    unet.train()
    te.train()
    losses: list[float] = []
    t_train = time.time()
    for step in range(cfg.steps):
        # every draw on the CPU (data, generator and scheduler live there); the batch then goes to the device
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=gen)
        x0, rows, states = latents[idx], ids[idx], None if fixed_states is None else fixed_states[idx.to(dev)]
        n_inst = cfg.batch
        if use_prior:
            pidx = torch.randint(0, len(prior_latents), (cfg.prior_batch,), generator=gen)
            x0 = torch.cat([x0, prior_latents[pidx]])
            rows = torch.cat([rows, prior_ids[pidx]])
            if states is not None:
                states = torch.cat([states, fixed_prior_states[pidx.to(dev)]])
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, n_train_t, (x0.shape[0],), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        target = noise if prediction == "epsilon" else noise_sched.get_velocity(x0, noise, t)
        xt, t, target, rows = xt.to(dev), t.to(dev), target.to(dev), rows.to(dev)
        if cfg.token_warmup and step == cfg.token_warmup:
            for p in lora_params:
                p.requires_grad_(True)
        for g, base in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = base * min(1.0, max(0, step + 1 - g["start"]) / max(1, cfg.warmup))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.autocast):
            per_layer = None
            if states is None:
                if cfg.layerwise:
                    # only the concept's rows carry learned tokens: prior rows are the same for every layer
                    inst = rows[:n_inst]
                    stacked = torch.cat([_layer_ids(inst, vocab, n_layers, layer) for layer in range(n_layers)])
                    per_layer = list(te(stacked)[0].chunk(n_layers))  # n_layers x (B, 77, D)
                    if len(rows) > n_inst:
                        shared = te(rows[n_inst:])[0]
                        per_layer = [torch.cat([s, shared]) for s in per_layer]
                    states = per_layer[0]
                else:
                    states = te(rows)[0]  # (B, 77, D): last hidden state, as the pipeline uses
            ctx = layerwise_states(unet, per_layer) if per_layer is not None else contextlib.nullcontext()
            with ctx:
                pred = unet(xt, t, states).sample
        err = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        loss = err[:n_inst].mean()
        if use_prior:
            loss = loss + cfg.prior_weight * err[n_inst:].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{data.description}: loss is {losses[-1]} at step {step}; lower the lr")
        if callback is not None:
            callback(step, losses[-1])
        if step + 1 in snapshots:
            on_snapshot(result_now(dataclasses.replace(cfg, steps=step + 1)))
        if log_every and ((step + 1) % log_every == 0 or step + 1 == cfg.steps):
            log.info("%s: step %d/%d loss %.4f (mean of last %d) %.2f steps/s", data.description, step + 1,
                     cfg.steps, float(np.mean(losses[-log_every:])), log_every, (step + 1) / (time.time() - t_train))
    return result_now(cfg)


@torch.no_grad()
def denoising_loss(pipe, data: ConceptData, layers: dict[str, LoraLayer] | None = None, *, n_draws: int = 4,
                   seed: int = 1234) -> float:
    """Mean noise-prediction MSE of ``pipe`` (+ ``layers`` if given) on ``data``'s images and captions.

    The noise and timesteps are drawn from ``seed`` (the same draws for every call), so values from the base
    model and from the model with a LoRA are directly comparable. Plain captions only (no learned tokens).
    Runs where ``pipe`` is (its UNet's device); the draws are made on the CPU.
    """
    from diffusers import DDPMScheduler

    from loraclr.surgery.hooks import apply_layers

    gen = torch.Generator().manual_seed(seed)  # draws on the CPU, then moved to the pipeline's device
    dev = _module_device(pipe.unet)
    latents = _encode_images(pipe.vae, data.images)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    total = []
    if layers and dev.type != "cpu":  # the hooks use the factors as they are: put them beside the weights
        layers = {k: LoraLayer(v.down.to(dev), v.up.to(dev), v.alpha) if isinstance(v, LoraLayer)
                  else type(v)(v.weight.to(dev)) for k, v in layers.items()}
    ctx = apply_layers(pipe, layers) if layers else contextlib.nullcontext()
    with ctx:
        ids = _tokenize(pipe.tokenizer, data.captions).to(_module_device(pipe.text_encoder))
        states = pipe.text_encoder(ids)[0].to(dev)  # with the text-encoder LoRA
        for _ in range(n_draws):
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, int(sched.config.num_train_timesteps), (len(latents),), generator=gen)
            target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
            xt = sched.add_noise(latents, noise, t)
            pred = pipe.unet(xt.to(dev), t.to(dev), states).sample
            total.append(F.mse_loss(pred.float().cpu(), target).item())
    return float(np.mean(total))
