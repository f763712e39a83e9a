"""The main job: encode an image with a vision tower (``--model gemma4``, ``llama4`` or ``gemma3``)
and report the soft tokens.

Random weights by default (seeded, so the checksum is reproducible on one machine), or an HF
checkpoint: a directory with ``config.json`` and ``*.safetensors`` (a model or its vision tower), or
a single ``.safetensors`` file (the released vision config of ``--preset`` / Llama 4 / Gemma 3 4B).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import torch

PRESETS = ("e2b", "e4b", "26b", "31b")


MODELS = ("gemma4", "llama4", "gemma3")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="gemma4", choices=MODELS,
                        help="the vision tower: gemma4 (default), llama4 (Scout / Maverick) or gemma3 (4B/12B/27B)")
    parser.add_argument("--image", help="image file (default: the bundled demo picture)")
    parser.add_argument("--checkpoint", help="HF checkpoint directory (config.json + safetensors) or .safetensors file")
    parser.add_argument("--preset", default="e2b", choices=PRESETS,
                        help="released vision config to build when no config.json is given (default e2b)")
    parser.add_argument("--max-soft-tokens", type=int, default=280, choices=(70, 140, 280, 560, 1120),
                        help="gemma4: the soft-token budget")
    parser.add_argument("--max-tiles", type=int, default=16, help="llama4: the most 336² tiles per image (16)")
    parser.add_argument("--pan-and-scan", action="store_true",
                        help="gemma3: add HF's pan-and-scan crops of an elongated image")
    parser.add_argument("--num-layers", type=int, default=None,
                        help="override the config's encoder layer count (random weights only; for quick runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--no-projector", action="store_true", help="stop at the vision tower's output")
    from . import _batch_encode

    _batch_encode.add_arguments(parser)


class UserError(Exception):
    """A problem with the command line or its files, reported as one line by ``python -m vitops``."""


def check_arguments(args) -> str | None:
    """What is wrong with the arguments before anything is built, or None."""
    if args.image is not None:
        if not os.path.exists(args.image):
            return f"--image {args.image}: no such file"
        if not os.path.isfile(args.image) or not os.access(args.image, os.R_OK):
            return f"--image {args.image}: not a readable file"
    if args.checkpoint is not None and not os.path.exists(args.checkpoint):
        return f"--checkpoint {args.checkpoint}: no such file or directory"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        return f"--device {args.device}: not a torch device (e.g. cpu, cuda, cuda:1)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            return f"--device {args.device}: CUDA is not available ({why}); use --device cpu"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) are visible"
    elif device.type != "cpu":
        return f"--device {args.device}: vitops runs on cpu or cuda"
    if args.max_tiles < 1:
        return f"--max-tiles {args.max_tiles}: must be at least 1"
    if args.num_layers is not None and (args.num_layers < 0 or args.checkpoint):
        return f"--num-layers {args.num_layers}: an int >= 0, with random weights only (not with --checkpoint)"
    from . import _batch_encode

    return _batch_encode.check_arguments(args)


def _hf_config(checkpoint: str | None):
    if checkpoint and os.path.isdir(checkpoint) and os.path.exists(os.path.join(checkpoint, "config.json")):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(checkpoint)
    return None


def _instantiate(args, config, model_cls, projector_cls, load):
    """The model and (unless --no-projector) its projector for ``config``, seeded random weights, loaded
    from --checkpoint when given; a checkpoint that does not fit or cannot be read is a UserError."""
    from .hf._checkpoint import CheckpointMismatchError

    dtype = getattr(torch, args.dtype)
    if args.num_layers is not None:
        config = config.replace(num_layers=args.num_layers)
    torch.manual_seed(args.seed)
    model = model_cls(config, device=args.device, dtype=dtype).eval()
    projector = None
    if not args.no_projector and config.text_hidden_size is not None:
        projector = projector_cls(config, device=args.device, dtype=dtype).eval()
    if args.checkpoint:
        try:
            load((model, projector), args.checkpoint)
        except CheckpointMismatchError as e:
            raise UserError(f"--checkpoint {args.checkpoint}: {e}") from e
        except Exception as e:  # noqa: BLE001 - any failure to read the user's file (safetensors, torch.load)
            raise UserError(f"--checkpoint {args.checkpoint}: cannot be read ({type(e).__name__}: {e})") from e
    return config, model, projector


def build(args):
    from .hf import load_hf_state_dict
    from .models.gemma4_vision import Gemma4VisionConfig, Gemma4VisionEncoderLayer, Gemma4VisionProjector

    try:
        hf_config = _hf_config(args.checkpoint)
    except Exception as e:  # noqa: BLE001 - an unreadable config.json
        raise UserError(f"--checkpoint {args.checkpoint}: config.json cannot be read ({type(e).__name__}: {e})") from e
    config = Gemma4VisionConfig.from_hf(hf_config) if hf_config is not None else Gemma4VisionConfig.preset(args.preset)
    return _instantiate(args, config, Gemma4VisionEncoderLayer, Gemma4VisionProjector, load_hf_state_dict)


def _load_image(args):
    from .preprocess import demo_image

    if args.image:
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(args.image)
            image.load()
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"--image {args.image}: not an image PIL can read ({e})") from e
        return image, args.image
    return demo_image(), "bundled demo image"


def _report(soft_tokens: torch.Tensor, what: str, t0: float, t1: float, t2: float) -> None:
    digest = hashlib.sha256(soft_tokens.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
    print(f"{what}: shape {tuple(soft_tokens.shape)} dtype {soft_tokens.dtype}")
    print(f"checksum: sum {soft_tokens.double().sum().item():.6f}  mean|x| {soft_tokens.double().abs().mean().item():.6f}"
          f"  sha256[:16] {digest}")
    print(f"time: preprocess {(t1 - t0) * 1e3:.1f} ms, encode {(t2 - t1) * 1e3:.1f} ms")


def _encode(args, encode):
    """``encode()`` under inference mode, finished on the device before the clock is read."""
    with torch.inference_mode():
        out = encode()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    return out


def run(args) -> int:
    if args.images is not None:  # batch mode: many images to a safetensors file
        from . import _batch_encode

        return _batch_encode.run(args)
    return {"llama4": run_llama4, "gemma3": run_gemma3}.get(args.model, run_gemma4)(args)


def build_gemma3(args):
    from .hf import gemma3 as hf_gemma3
    from .models.gemma3 import Gemma3VisionConfig, Gemma3VisionEncoderLayer, VisionEmbedder

    config = Gemma3VisionConfig(text_hidden_size=2560)  # the released tower; the 4B text width
    if args.checkpoint and os.path.isdir(args.checkpoint) and os.path.exists(os.path.join(args.checkpoint,
                                                                                         "config.json")):
        try:
            config = hf_gemma3.config_from_hf(args.checkpoint)
        except Exception as e:  # noqa: BLE001 - an unreadable or foreign config.json
            raise UserError(f"--checkpoint {args.checkpoint}: not a Gemma 3 config.json ({type(e).__name__}: {e})") from e
    return _instantiate(args, config, Gemma3VisionEncoderLayer, VisionEmbedder, hf_gemma3.load_hf_state_dict)


def run_gemma3(args) -> int:
    from .models.gemma3 import encode_images
    from .preprocess import Gemma3ImageProcessor

    config, tower, projector = build_gemma3(args)
    image, source = _load_image(args)
    processor = Gemma3ImageProcessor(size=config.image_size, do_pan_and_scan=args.pan_and_scan)
    t0 = time.perf_counter()
    batch = processor(image).to(args.device)
    t1 = time.perf_counter()

    def encode():
        # [images + crops, 1, 256, D]: the exit pooling and the projector's norm are one op
        tokens = encode_images(tower, projector, batch.nhwc().to(getattr(torch, args.dtype)))
        return tokens.flatten(0, 2)  # the whole image's tokens, then each crop's

    soft_tokens = _encode(args, encode)
    t2 = time.perf_counter()
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else f"random weights (seed {args.seed})"
    print(f"vitops Gemma 3 vision tower: {weights}, {config.num_layers} layers, {args.dtype} on {args.device}")
    crops = batch.num_crops[0]
    print(f"image: {source}, H x W {image.size[1]} x {image.size[0]} -> {config.image_size}²"
          f"{f' + {crops} pan-and-scan crops' if crops else ''}, {config.mm_tokens_per_image} soft tokens each")
    what = "soft tokens (after the projector)" if projector is not None else "vision tower output"
    _report(soft_tokens, what, t0, t1, t2)
    return 0


def build_llama4(args):
    from .hf import llama4 as hf_llama4
    from .models.llama4 import Llama4MultiModalProjector, Llama4VisionConfig, Llama4VisionModel

    config = Llama4VisionConfig()
    if args.checkpoint and os.path.isdir(args.checkpoint) and os.path.exists(os.path.join(args.checkpoint,
                                                                                         "config.json")):
        try:
            config = hf_llama4.config_from_hf(args.checkpoint)
        except Exception as e:  # noqa: BLE001 - an unreadable or foreign config.json
            raise UserError(f"--checkpoint {args.checkpoint}: not a Llama 4 config.json ({type(e).__name__}: {e})") from e
    return _instantiate(args, config, Llama4VisionModel, Llama4MultiModalProjector, hf_llama4.load_hf_state_dict)


def run_llama4(args) -> int:
    from .preprocess import Llama4ImageProcessor

    config, model, projector = build_llama4(args)
    image, source = _load_image(args)
    processor = Llama4ImageProcessor(max_patches=args.max_tiles, size=config.image_size)
    t0 = time.perf_counter()
    batch = processor(image).to(args.device)
    t1 = time.perf_counter()
    def encode():
        tokens = model(batch.pixel_values.to(getattr(torch, args.dtype)))  # [tiles, 144, vision_output_dim]
        if projector is not None:
            tokens = projector(tokens)
        return tokens.flatten(0, 1)  # every tile's tokens in order: local tiles row-major, then global

    soft_tokens = _encode(args, encode)
    t2 = time.perf_counter()
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else f"random weights (seed {args.seed})"
    print(f"vitops Llama 4 vision model: {weights}, {config.num_layers} layers, {args.dtype} on {args.device}")
    rows, cols = batch.aspect_ratios[0].tolist()
    print(f"image: {source}, H x W {image.size[1]} x {image.size[0]} -> {rows} x {cols} tiles of {config.image_size}²"
          f"{' + a global tile' if rows * cols > 1 else ''} ({batch.tiles_per_image[0]} tiles, "
          f"{config.tokens_per_tile} soft tokens each)")
    what = "soft tokens (after the projector)" if projector is not None else "vision model output"
    _report(soft_tokens, what, t0, t1, t2)
    return 0


def run_gemma4(args) -> int:
    from .preprocess import Gemma4ImageProcessor

    config, tower, projector = build(args)
    image, source = _load_image(args)
    processor = Gemma4ImageProcessor(patch_size=config.patch_size, pooling_kernel_size=config.pooling_kernel_size,
                                     max_soft_tokens=args.max_soft_tokens)
    t0 = time.perf_counter()
    batch = processor(image).to(args.device)
    t1 = time.perf_counter()
    def encode():
        tokens, mask = tower(batch.pixel_values.to(getattr(torch, args.dtype)),
                             image_position_ids=batch.pixel_position_ids, output_length=args.max_soft_tokens)
        if projector is not None:
            tokens = projector(tokens)
        return tokens[mask]  # HF's flattened form: padding slots removed

    soft_tokens = _encode(args, encode)
    t2 = time.perf_counter()

    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else f"random weights (preset {args.preset}, seed {args.seed})"
    print(f"vitops Gemma 4 vision tower: {weights}, {args.dtype} on {args.device}")
    (rh, rw), (gh, gw) = batch.resized_hw[0], batch.patch_grid_hw[0]
    print(f"image: {source}, H x W {image.size[1]} x {image.size[0]} -> resized {rh} x {rw}, "
          f"patch grid {gh} x {gw}, "
          f"{batch.num_soft_tokens_per_image[0]} soft tokens (budget {args.max_soft_tokens})")
    what = "soft tokens (after the projector)" if projector is not None else "vision tower output"
    _report(soft_tokens, what, t0, t1, t2)
    return 0
