"""``python -m vitops encode --images DIR_OR_GLOB --out FILE.safetensors``: many images encoded in
packed batches (:func:`vitops.serving.encode_packed`), resumable, sharded over torchrun processes.

Layout of the work (all beside ``--out``):

* ``FILE.safetensors.parts/``: one safetensors chunk per finished pack, written atomically (a
  temporary file renamed into place), holding each image's soft tokens under its id and, in the
  metadata, the run's settings and each image's size. A run that stops (killed, out of time,
  ``--max-packs``) leaves its finished packs there; the same command again skips every image a
  chunk holds and encodes the rest.
* Under torchrun every process takes a disjoint shard of the sorted image list (image ``i`` goes to
  rank ``i mod world_size``), encodes its shard and writes ``FILE.rank{r}-of-{w}.safetensors``, its
  shard's soft tokens; after a barrier (gloo) rank 0 merges the shards into ``FILE.safetensors``.
  Without torchrun the one process is rank 0 of 1 and writes ``FILE.safetensors`` directly.
* When ``FILE.safetensors`` is written, the chunks (and, without ``--keep-shards``, the rank files)
  are removed.

The output maps each image id (its path relative to the directory, or to the glob's base) to its
soft tokens ``[tokens, H]``; the metadata key ``vitops`` holds JSON with the settings, each image's
original height, width and token count, and the images/s of the run.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from ._demo import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
_META_KEY = "vitops"


def add_arguments(parser) -> None:
    parser.add_argument("--images", help="batch mode: a directory (searched recursively) or a glob pattern of images")
    parser.add_argument("--out", help="batch mode: the output .safetensors file (soft tokens per image id)")
    parser.add_argument("--pack-size", type=int, default=8, help="batch mode: images per packed call (8)")
    parser.add_argument("--max-packs", type=int, default=None,
                        help="batch mode: stop after this many packs (resumable; e.g. time-boxed jobs)")
    parser.add_argument("--restart", action="store_true",
                        help="batch mode: discard the unfinished work of an earlier run instead of resuming it")
    parser.add_argument("--keep-shards", action="store_true",
                        help="batch mode under torchrun: keep the per-rank files after the merge")
    parser.add_argument("--no-progress", action="store_true", help="batch mode: no progress bar")


def check_arguments(args) -> str | None:
    if args.images is None:
        if args.out is not None:
            return "--out is for batch mode: give --images too"
        return None
    if args.image is not None:
        return "give either --image (one image) or --images (batch mode), not both"
    if args.out is None:
        return "--images needs --out FILE.safetensors"
    if not args.out.endswith(".safetensors"):
        return f"--out {args.out}: must end in .safetensors"
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        return f"--out {args.out}: the directory {parent} does not exist"
    if args.pack_size < 1:
        return f"--pack-size {args.pack_size}: must be at least 1"
    if args.max_packs is not None and args.max_packs < 0:
        return f"--max-packs {args.max_packs}: must be >= 0"
    if not list_images(args.images):
        return f"--images {args.images}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})"
    return None


def list_images(spec: str) -> list[tuple[str, str]]:
    """``(image id, path)`` pairs, sorted by id: every image file below a directory (ids relative to
    it), or the files a glob pattern matches (ids relative to the pattern's fixed leading part)."""
    if os.path.isdir(spec):
        base, paths = spec, []
        for root, _, files in os.walk(spec):
            paths += [os.path.join(root, f) for f in files]
    else:
        paths = glob.glob(spec, recursive=True)
        fixed = []
        for part in spec.split(os.sep):
            if glob.has_magic(part):
                break
            fixed.append(part)
        base = os.sep.join(fixed) or "."
        if not os.path.isdir(base):
            base = os.path.dirname(base) or "."
    found = [(os.path.relpath(p, base).replace(os.sep, "/"), p) for p in paths
             if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def _settings(args) -> dict:
    """What determines the soft tokens: a resumed run must match the run that wrote the chunks."""
    return dict(model=args.model, checkpoint=os.path.abspath(args.checkpoint) if args.checkpoint else None,
                preset=args.preset if args.model == "gemma4" else None, dtype=args.dtype, seed=args.seed,
                num_layers=args.num_layers, projector=not args.no_projector,
                max_soft_tokens=args.max_soft_tokens if args.model == "gemma4" else None,
                max_tiles=args.max_tiles if args.model == "llama4" else None,
                pan_and_scan=args.pan_and_scan if args.model == "gemma3" else None)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: bool = False

    @classmethod
    def from_env(cls) -> "_Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")  # only a barrier is needed: gloo works with any device
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True)

    def barrier(self) -> None:
        if self.group:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _atomic_save(tensors: dict, metadata: dict, path: str) -> None:
    from safetensors.torch import save_file

    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata={_META_KEY: json.dumps(metadata)})
    os.replace(tmp, path)


def _read_meta(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return json.loads((f.metadata() or {}).get(_META_KEY, "{}"))


def _done_images(parts_dir: str, settings: dict, restart: bool) -> dict[str, str]:
    """image id -> the chunk holding it, from an earlier run's chunks (which must share the settings)."""
    done: dict[str, str] = {}
    out = parts_dir[: -len(".parts")]
    names = sorted(os.listdir(parts_dir)) if os.path.isdir(parts_dir) else []
    sources = [out] if os.path.exists(out) else []  # a finished earlier run: its images are done too
    for name in names:
        path = os.path.join(parts_dir, name)
        if name.endswith(".safetensors"):
            sources.append(path)
        elif ".tmp" in name:
            os.remove(path)  # a chunk whose write was interrupted
    for path in sources:
        meta = _read_meta(path)
        if meta.get("settings") != settings:
            if restart:
                os.remove(path)
                continue
            raise UserError(f"--out: {path} holds work of a run with other settings ({meta.get('settings')}); "
                            "run the same command as before to resume it, or add --restart to discard it")
        for image_id in meta.get("images", {}):
            done[image_id] = path
    return done


def _progress(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)


def _load(path: str):
    from PIL import Image

    image = Image.open(path)
    image.load()
    return image


def run(args) -> int:
    from . import _demo
    from .serving import encode_packed

    dist = _Dist.from_env()
    try:
        device = args.device
        if dist.world > 1 and device == "cuda":
            device = f"cuda:{dist.local_rank}"  # one GPU per process
        args.device = device
        builders = {"gemma4": _demo.build, "gemma3": _demo.build_gemma3, "llama4": _demo.build_llama4}
        config, model, projector = builders[args.model](args)
        processor = _processor(args, config)
        settings = _settings(args)
        out = os.path.abspath(args.out)
        parts_dir = out + ".parts"
        images = list_images(args.images)
        done = _done_images(parts_dir, settings, args.restart) if dist.rank == 0 else None
        dist.barrier()  # rank 0 alone removes what --restart discards
        if dist.rank:
            done = _done_images(parts_dir, settings, False)
        dist.barrier()  # every rank has read the chunks before any rank writes or removes one
        os.makedirs(parts_dir, exist_ok=True)
        shard = [item for i, item in enumerate(images) if i % dist.world == dist.rank]
        todo = [item for item in shard if item[0] not in done]
        tag = f"rank {dist.rank}/{dist.world}: " if dist.world > 1 else ""
        print(f"{tag}{len(shard)} images in this shard, {len(shard) - len(todo)} already done, {len(todo)} to encode "
              f"({args.model}, {args.dtype} on {device})", flush=True)
        bar = _progress(len(shard), len(shard) - len(todo), not args.no_progress, f"encode{' r%d' % dist.rank if dist.world > 1 else ''}")
        failed: list[str] = []
        encoded, packs, start = 0, 0, time.perf_counter()
        for p in range(0, len(todo), args.pack_size):
            if args.max_packs is not None and packs >= args.max_packs:
                break
            pack, loaded = todo[p:p + args.pack_size], []
            for image_id, path in pack:
                try:
                    loaded.append((image_id, _load(path)))
                except Exception as e:  # noqa: BLE001 - an unreadable file is reported, the run goes on
                    failed.append(image_id)
                    print(f"{tag}skipped {image_id}: not an image PIL can read ({type(e).__name__}: {e})",
                          file=sys.stderr, flush=True)
            if loaded:
                with torch.inference_mode():
                    enc = encode_packed(model, [im for _, im in loaded], embedder=projector, processor=processor,
                                        **({"max_soft_tokens": args.max_soft_tokens} if args.model == "gemma4" else {}))
                tokens = {image_id: t.detach().to("cpu").contiguous()
                          for (image_id, _), t in zip(loaded, enc.split())}
                sizes = {image_id: [im.height, im.width, tokens[image_id].shape[0]] for image_id, im in loaded}
                chunk = os.path.join(parts_dir, f"chunk-{time.time_ns()}-r{dist.rank}.safetensors")
                _atomic_save(tokens, dict(settings=settings, images=sizes), chunk)
                encoded += len(loaded)
            packs += 1
            if bar is not None:
                bar.update(len(pack))
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        rate = encoded / seconds if seconds > 0 else 0.0
        print(f"{tag}encoded {encoded} images in {seconds:.2f} s: {rate:.2f} images/s", flush=True)
        finished = len(todo) - encoded - len(failed) == 0
        complete = _all_ranks(dist, finished)
        if not complete:
            print(f"{tag}stopped before the end; run the same command again to resume", flush=True)
            return 0 if not failed else 1
        _finish(dist, out, parts_dir, images, settings, rate, args.keep_shards, failed)
        return 0 if _all_ranks(dist, not failed) else 1
    finally:
        dist.close()


def _all_ranks(dist: _Dist, flag: bool) -> bool:
    if not dist.group:
        return flag
    import torch.distributed as dist_mod

    t = torch.tensor([int(flag)])
    dist_mod.all_reduce(t, op=dist_mod.ReduceOp.MIN)
    return bool(t.item())


def _processor(args, config):
    if args.model == "gemma4":
        from .preprocess import Gemma4ImageProcessor

        return Gemma4ImageProcessor(patch_size=config.patch_size, pooling_kernel_size=config.pooling_kernel_size,
                                    max_soft_tokens=args.max_soft_tokens)
    if args.model == "gemma3":
        from .preprocess import Gemma3ImageProcessor

        return Gemma3ImageProcessor(size=config.image_size, do_pan_and_scan=args.pan_and_scan)
    from .preprocess import Llama4ImageProcessor

    return Llama4ImageProcessor(max_patches=args.max_tiles, size=config.image_size)


def _gather(chunk_paths: list[str], wanted: set[str]) -> tuple[dict, dict]:
    """The soft tokens and sizes of the wanted image ids, read lazily from the chunks."""
    from safetensors import safe_open

    tensors, sizes = {}, {}
    for path in chunk_paths:
        meta = _read_meta(path)
        keys = [k for k in meta.get("images", {}) if k in wanted and k not in tensors]
        if not keys:
            continue
        with safe_open(path, framework="pt") as f:
            for k in keys:
                tensors[k] = f.get_tensor(k)
                sizes[k] = meta["images"][k]
    return tensors, sizes


def _finish(dist: _Dist, out: str, parts_dir: str, images: list, settings: dict, rate: float, keep_shards: bool,
            failed: list[str]) -> None:
    """Per-rank shard files, then rank 0's merge into ``out``; chunks removed once ``out`` exists."""
    chunks = sorted(os.path.join(parts_dir, n) for n in os.listdir(parts_dir) if n.endswith(".safetensors"))
    earlier = [out] if os.path.exists(out) else []  # images a finished earlier run wrote
    shard_ids = {image_id for i, (image_id, _) in enumerate(images) if i % dist.world == dist.rank}
    tensors, sizes = _gather(chunks + earlier, shard_ids)
    root, _ = os.path.splitext(out)
    shard_path = f"{root}.rank{dist.rank}-of-{dist.world}.safetensors"
    if dist.world > 1:
        _atomic_save(tensors, dict(settings=settings, images=sizes, images_per_second=rate), shard_path)
    dist.barrier()
    rates = _gather_rates(dist, rate)
    if dist.rank == 0:
        if dist.world > 1:
            shard_paths = [f"{root}.rank{r}-of-{dist.world}.safetensors" for r in range(dist.world)]
            tensors, sizes = _gather(shard_paths, {image_id for image_id, _ in images})
        order = [image_id for image_id, _ in images if image_id in tensors]
        meta = dict(settings=settings, images={k: sizes[k] for k in order}, images_per_second=sum(rates),
                    images_per_second_per_rank=rates, failed=sorted(set(failed)))
        _atomic_save({k: tensors[k] for k in order}, meta, out)
        for path in chunks:
            os.remove(path)
        if not os.listdir(parts_dir):
            os.rmdir(parts_dir)
        if dist.world > 1 and not keep_shards:
            for r in range(dist.world):
                os.remove(f"{root}.rank{r}-of-{dist.world}.safetensors")
        print(f"wrote {out}: {len(order)} images, {sum(v[2] for v in meta['images'].values())} soft tokens",
              flush=True)
    dist.barrier()


def _gather_rates(dist: _Dist, rate: float) -> list[float]:
    if not dist.group:
        return [rate]
    import torch.distributed as dist_mod

    out = [None] * dist.world
    dist_mod.all_gather_object(out, rate)
    return [float(r) for r in out]
