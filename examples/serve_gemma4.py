"""End to end: the vision path of a Gemma 4 serving engine on vitops, generating with HF's text model.

Two requests share an image (the second is a cache hit) and the second also shows a video:

1. images and videos are preprocessed (``Gemma4ImageProcessor`` / ``Gemma4VideoProcessor``) and keyed by
   content (``image_content_hash``);
2. every image the cache misses, and every video frame, is encoded in ONE packed call
   (``encode_packed``: mixed sizes, no padding FLOPs) and the images are ``put`` in the cache;
3. the soft tokens are written into the text embeddings with the ``merge_soft_tokens`` op at the
   indices ``soft_token_indices`` builds from the token ids (no host sync);
4. HF's text model prefills from those embeddings and decodes greedily; the tokens equal HF's own
   ``model.generate`` with the pixels (HF's tower, HF's ``masked_scatter``);
5. ``cache.release(request_id)`` when the request ends.

A tiny random model (no download): ``python examples/serve_gemma4.py``. ``tests/test_serving_e2e.py``
runs it.
"""

from __future__ import annotations

import dataclasses

import torch

IMAGE, VIDEO, BOI, EOI, PAD = 300, 303, 301, 302, 0
TEXT = list(range(10, 40))  # ordinary token ids of the tiny vocabulary


def tiny_model(seed: int = 0):
    """A tiny random HF Gemma4ForConditionalGeneration (vision tower, embedder, 2-layer text model with
    per-layer inputs like E2B), eval mode, every weight random."""
    import transformers as t

    vc = t.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, patch_size=4, position_embedding_size=128,
                              pooling_kernel_size=3, standardize=True)
    tc = t.Gemma4TextConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
                            hidden_size_per_layer_input=8, vocab_size_per_layer_input=320, sliding_window=16,
                            layer_types=["sliding_attention", "full_attention"], pad_token_id=PAD)
    cfg = t.Gemma4Config(text_config=tc, vision_config=vc, audio_config=None, image_token_id=IMAGE,
                         video_token_id=VIDEO, audio_token_id=304, boi_token_id=BOI, eoi_token_id=EOI)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = t.Gemma4ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # HF zero-initialises some norms and projections: every weight random here
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5)
                    + (1.0 if name.endswith("std_scale") else 0.0))
    return model


@dataclasses.dataclass
class Request:
    request_id: str
    text_before: list[int]
    images: list  # PIL / arrays / tensors, each shown once at its placeholder
    video: torch.Tensor | None = None  # [F, H, W, 3] uint8
    text_after: list[int] = dataclasses.field(default_factory=lambda: [11, 12])


class VisionPath:
    """The serving engine's vision side: preprocess, cache lookup, one packed encode of the misses, merge."""

    def __init__(self, hf_model, *, model_name: str = "tiny-gemma4", max_soft_tokens: int = 70,
                 cache_bytes: int = 1 << 20):
        from vitops.hf import from_hf
        from vitops.preprocess import Gemma4ImageProcessor, Gemma4VideoProcessor
        from vitops.serving import VisionEncoderCache

        self.hf = hf_model
        self.tower, self.projector = from_hf(hf_model.config, hf_model.state_dict())
        vc = hf_model.config.vision_config
        self.images = Gemma4ImageProcessor(patch_size=vc.patch_size, pooling_kernel_size=vc.pooling_kernel_size,
                                           max_soft_tokens=max_soft_tokens)
        self.videos = Gemma4VideoProcessor(patch_size=vc.patch_size, pooling_kernel_size=vc.pooling_kernel_size,
                                           max_soft_tokens=max_soft_tokens, num_frames=4)
        self.cache = VisionEncoderCache(cache_bytes)
        self.model_name, self.budget = model_name, max_soft_tokens
        self.encoded_images = 0  # images the tower actually ran on (cache misses)

    def prompt(self, req: Request, image_tokens: list[int], video=None) -> torch.Tensor:
        ids = list(req.text_before)
        for n in image_tokens:
            ids += [BOI] + [IMAGE] * n + [EOI]
        if video is not None:  # per frame "mm:ss <boi> <|video|> x n <eoi>" (timestamps: two text tokens here)
            for f in range(video.num_frames):
                ids += [20 + f, 21, BOI] + [VIDEO] * video.num_soft_tokens_per_video[0] + [EOI]
        return torch.tensor([ids + req.text_after])

    def soft_tokens(self, req: Request):
        """``(prompt ids [1, S], image soft tokens [N_img, H], video soft tokens [N_vid, H])``."""
        from vitops.serving import encode_packed, image_content_hash

        pres = [self.images(im) for im in req.images]
        keys = [image_content_hash(p.pixel_values[0], p.pixel_position_ids[0], model=self.model_name,
                                   budget=self.budget, dtype=torch.float32) for p in pres]
        cached = [self.cache.acquire(req.request_id, k) for k in keys]
        misses = [i for i, c in enumerate(cached) if c is None]
        video = self.videos(req.video) if req.video is not None else None
        parts = [pres[i] for i in misses] + ([video] if video is not None else [])
        if parts:  # every missed image and every video frame in one packed call
            with torch.no_grad():
                enc = encode_packed(self.tower, parts, embedder=self.projector)
            rows = list(enc.split())
            for i in misses:
                cached[i] = self.cache.put(req.request_id, keys[i], rows.pop(0))
            self.encoded_images += len(misses)
            video_rows = torch.cat(rows) if video is not None else None
        else:
            video_rows = None
        ids = self.prompt(req, [p.num_soft_tokens_per_image[0] for p in pres], video)
        image_rows = torch.cat(cached) if cached else None
        return ids, image_rows, video_rows

    def embed(self, ids: torch.Tensor, image_rows, video_rows):
        """HF's ``Gemma4Model.forward`` up to the language model, with the merge op: text embeddings
        (multimodal placeholders looked up as PAD), per-layer inputs (PAD rows there), soft tokens
        written at the placeholder rows."""
        from vitops.serving import merge_soft_tokens, soft_token_indices

        m = self.hf.model
        multimodal = (ids == IMAGE) | (ids == VIDEO)
        llm_ids = torch.where(multimodal, PAD, ids)
        with torch.no_grad():
            embeds = m.get_input_embeddings()(llm_ids)
            per_layer = m.language_model.get_per_layer_inputs(llm_ids, embeds)
            for rows, token in ((image_rows, IMAGE), (video_rows, VIDEO)):
                if rows is not None:
                    indices = soft_token_indices(ids, token, rows.shape[0])  # no host sync: N is known
                    embeds = merge_soft_tokens(embeds, rows, indices)
        return embeds, per_layer

    def generate(self, req: Request, max_new_tokens: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding from the merged embeddings with HF's text model and KV cache."""
        ids, image_rows, video_rows = self.soft_tokens(req)
        embeds, per_layer = self.embed(ids, image_rows, video_rows)
        out = []
        with torch.no_grad():
            step = self.hf(inputs_embeds=embeds, per_layer_inputs=per_layer,
                           attention_mask=torch.ones_like(ids), use_cache=True)
            for _ in range(max_new_tokens):
                token = step.logits[:, -1].argmax(-1, keepdim=True)
                out.append(token)
                mask = torch.ones(1, ids.shape[1] + len(out), dtype=ids.dtype)
                step = self.hf(input_ids=token, past_key_values=step.past_key_values, attention_mask=mask,
                               use_cache=True)
        return ids, torch.cat(out, dim=1)

    def release(self, req: Request) -> None:
        self.cache.release(req.request_id)


def hf_generate(hf_model, path: VisionPath, req: Request, ids: torch.Tensor, max_new_tokens: int = 8) -> torch.Tensor:
    """HF's own path for the same inputs: ``generate`` with the pixels (HF's tower, masked_scatter)."""
    kwargs = {}
    if req.images:
        pre = path.images(req.images)
        kwargs.update(pixel_values=pre.pixel_values, image_position_ids=pre.pixel_position_ids)
    if req.video is not None:
        video = path.videos(req.video)
        kwargs.update(pixel_values_videos=video.pixel_values_videos, video_position_ids=video.video_position_ids)
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, **kwargs)
    return out[:, ids.shape[1]:]


def demo_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, 256, (64, 90, 3), dtype=torch.uint8, generator=g)
    other = torch.randint(0, 256, (50, 40, 3), dtype=torch.uint8, generator=g)
    video = torch.randint(0, 256, (9, 40, 56, 3), dtype=torch.uint8, generator=g)
    return [Request("r1", [2, 10, 11], [shared, other]),
            Request("r2", [2, 12], [shared], video=video, text_after=[13, 14, 15])]


def main() -> int:
    hf_model = tiny_model()
    path = VisionPath(hf_model)
    for req in demo_inputs():
        ids, ours = path.generate(req)
        theirs = hf_generate(hf_model, path, req, ids)
        s = path.cache.stats()
        print(f"{req.request_id}: prompt {ids.shape[1]} tokens, vitops {ours.tolist()[0]}, HF {theirs.tolist()[0]}, "
              f"{'equal' if torch.equal(ours, theirs) else 'DIFFERENT'}; cache hits {s.hits}, misses {s.misses}")
        path.release(req)
    s = path.cache.stats()
    print(f"encoded {path.encoded_images} images for 3 shown; cache: {s.entries} entries, {s.bytes_in_use} bytes, "
          f"{s.requests} live requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
