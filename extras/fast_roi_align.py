"""RoIAlign from multi-threaded torch ops: a drop-in for torchvision.ops.roi_align when training on CPU.

torchvision's CPU kernel for RoIAlign runs on one thread, forward and backward (`_roi_align_backward` loops over
every output element, scattering its gradient into the 4 neighbours of each sample point), and on CPU it takes a
large share of an R-CNN training step. Here the same computation is one weighted gather:

    every output cell (roi k, bin p, q) = sum over its sampling_ratio^2 sample points and their 4 bilinear
    neighbours of weight * feature row [C]

The feature map is laid out as a table of N*H*W rows of C channels (a view when it is channels_last), and
`F.embedding_bag(mode="sum", per_sample_weights=...)` computes those weighted sums: a vectorised kernel that
splits the bins over threads, and whose backward (a sort of the row indices, then each feature row's gradient
summed by one thread) is multi-threaded too. Autograd derives the backward; nothing here is a custom kernel.

Semantics are torchvision's (aligned, boundary rules, spatial_scale, bins): the tests compare both.
`sampling_ratio <= 0` (a grid that adapts to each box's size) falls back to torchvision's op; the R-CNN heads
all use sampling_ratio=2. Computation is in fp32 (fp64 for fp64 input); a bf16 input, as autocast passes it,
gives a bf16 output, as torchvision's autocast wrapper does.

Use it in a torchvision R-CNN with `use_fast_roi_align(model)`, which swaps the model's MultiScaleRoIAlign
poolers for `FastMultiScaleRoIAlign` (no parameters, so the state dict is unchanged).

On 2 cores (Zen 4) the pooling of R-CNN's box and mask heads, forward + backward, runs 5-10x faster than
torchvision's (1.5-1.7x of that from the second thread). It relies on both threads: when other processes keep
the cores busy, OpenMP's default spin-waiting makes each of its short parallel regions (the index sort of the
backward alone has several barriers) wait for a preempted thread, and the gain can vanish; OMP_WAIT_POLICY=PASSIVE
brought it back in that case (at some cost to the rest of the step: measure).
"""

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

# Private torchvision helpers, checked against torchvision 0.29: _filter_input picks the pooled maps by name and
# _setup_scales infers each map's scale and the level mapper. tests/test_roi_align.py compares this pooler with
# torchvision's MultiScaleRoIAlign on several levels, so a change in either fails there.
from torchvision.ops.poolers import MultiScaleRoIAlign, _filter_input, _setup_scales

# The poolers a torchvision R-CNN may hold (attributes of model.roi_heads)
POOLER_NAMES = ("box_roi_pool", "mask_roi_pool", "keypoint_roi_pool")


def _to_rois(boxes) -> Tensor:
    """[K, 5] (batch index, x1, y1, x2, y2) from either that tensor or a list of per-image [K_i, 4] boxes."""
    if isinstance(boxes, Tensor):
        return boxes
    image_index = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(image_index), torch.cat(list(boxes))], dim=1)


def _axis_samples(start: Tensor, size: Tensor, bins: int, sampling_ratio: int, length: int):
    """Neighbour indices and bilinear weights of the sample points along one axis of every roi.

    start, size: [K] roi start and extent, in feature cells. Returns (index, weight), both
    [K, bins, sampling_ratio * 2]: for each bin, sample s's two neighbours sit at [..., 2 s] and [..., 2 s + 1].
    Weights of samples off the map (below -1 or above length, in cells) are 0; the others are clamped onto it.
    """
    bin_size = size[:, None] / bins  # [K, 1] cells
    bin_index = torch.arange(bins, dtype=start.dtype, device=start.device).repeat_interleave(sampling_ratio)
    in_bin = (torch.arange(sampling_ratio, dtype=start.dtype, device=start.device) + 0.5).repeat(bins)
    # Same arithmetic order as torchvision's kernel, so a sample on the map's edge (-1 or length) falls on the
    # same side of it in both
    pos = start[:, None] + bin_index * bin_size + in_bin * bin_size / sampling_ratio  # [K, bins * sr]
    on_map = (pos >= -1.0) & (pos <= length)
    pos = pos.clamp(0, length - 1)
    low = pos.floor()
    frac = pos - low
    low = low.long()
    high = (low + 1).clamp(max=length - 1)
    index = torch.stack([low, high], dim=-1)  # [K, bins * sr, 2]
    weight = torch.stack([1 - frac, frac], dim=-1) * on_map[..., None]
    return index.view(-1, bins, sampling_ratio * 2), weight.view(-1, bins, sampling_ratio * 2)


def _roi_align_nhwc(input: Tensor, rois: Tensor, output_size, spatial_scale, sampling_ratio, aligned) -> Tensor:
    """RoIAlign of input [N, C, H, W] over rois [K, 5]; returns [K, out_h, out_w, C] in fp32 (fp64 for fp64)."""
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    compute_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    if sampling_ratio <= 0:  # per-box grid sizes: not vectorised here, use torchvision's kernel
        args = ((out_h, out_w), spatial_scale, sampling_ratio, aligned)
        out = torchvision.ops.roi_align(input.to(compute_dtype), rois.to(compute_dtype), *args)
        return out.permute(0, 2, 3, 1)
    num_images, channels, height, width = input.shape
    # Table of feature rows [N * H * W, C]: a view of a channels_last input, else one copy (+ cast of bf16)
    # (.to skips the layout change when the dtype already matches, hence the .contiguous())
    table = input.permute(0, 2, 3, 1).to(compute_dtype, memory_format=torch.contiguous_format).contiguous()
    table = table.view(num_images * height * width, channels)

    # The box geometry has no gradient (as in torchvision): only the features are differentiated.
    rois = rois.detach().to(compute_dtype)
    offset = 0.5 if aligned else 0.0  # aligned=True moves the pixel model by half a cell
    x1 = rois[:, 1] * spatial_scale - offset
    y1 = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - x1
    roi_h = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:  # the legacy behaviour: tiny boxes are stretched to one cell
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    y_index, y_weight = _axis_samples(y1, roi_h, out_h, sampling_ratio, height)  # [K, out_h, 2 sr]
    x_index, x_weight = _axis_samples(x1, roi_w, out_w, sampling_ratio, width)  # [K, out_w, 2 sr]

    # Every (y neighbour, x neighbour) pair of a bin: [K, out_h, out_w, 2 sr, 2 sr] -> rows of the table.
    # A bin averages its sr^2 samples: fold that 1/sr^2 into the y weights.
    row_start = rois[:, 0].long() * (height * width)  # [K] first table row of the roi's image
    y_rows = (row_start[:, None, None] + y_index * width)[:, :, None, :, None]
    index = y_rows + x_index[:, None, :, None, :]
    y_weight = y_weight / (sampling_ratio * sampling_ratio)
    weight = y_weight[:, :, None, :, None] * x_weight[:, None, :, None, :]
    bag = 4 * sampling_ratio * sampling_ratio  # table rows summed per output cell (16 for sampling_ratio=2)
    pooled = F.embedding_bag(index.view(-1, bag), table, mode="sum", per_sample_weights=weight.view(-1, bag))
    return pooled.view(-1, out_h, out_w, channels)  # [K, out_h, out_w, C]


def _to_nchw(pooled: Tensor, like: Tensor) -> Tensor:
    """[K, h, w, C] -> [K, C, h, w] in like's dtype; contiguous unless like is channels_last (then no copy)."""
    out = pooled.permute(0, 3, 1, 2).to(like.dtype)
    channels_last = like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last)
    return out if channels_last and not like.is_contiguous() else out.contiguous()


def roi_align(input: Tensor, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False) -> Tensor:
    """torchvision.ops.roi_align, computed by a multi-threaded weighted gather (see the module docstring).

    input [N, C, H, W]; boxes [K, 5] (image index, x1, y1, x2, y2) or a list of per-image [K_i, 4], in image
    pixels; spatial_scale = feature cells per pixel (1/stride). Returns [K, C, out_h, out_w].
    """
    # Autocast would run the gather in bf16; like torchvision's autocast wrapper, compute in fp32 instead.
    with torch.autocast(input.device.type, enabled=False):
        pooled = _roi_align_nhwc(input, _to_rois(boxes), output_size, spatial_scale, sampling_ratio, aligned)
    return _to_nchw(pooled, input)


class FastMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (same constructor, level assignment and output) using `roi_align` above."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _to_rois(boxes)
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio)

        levels = self.map_levels(boxes)  # [K] level of each roi, 0 = finest map
        per_level = torch.bincount(levels, minlength=len(features)).tolist()
        with torch.autocast(features[0].device.type, enabled=False):
            if max(per_level) == len(rois):  # all rois on one level (so in the mobilenet models), or no rois
                level = per_level.index(len(rois))
                args = (self.output_size, self.scales[level], self.sampling_ratio, False)
                return _to_nchw(_roi_align_nhwc(features[level], rois, *args), features[0])
            # Pool each level's rois from its map, then put the rows back in the boxes' order. The rows are cast
            # to the output dtype (that of the first map, as torchvision's pooler) first: bf16 halves the copies.
            order = torch.argsort(levels, stable=True)  # roi indices grouped by level
            pooled = [
                _roi_align_nhwc(feature, rois[index], self.output_size, scale, self.sampling_ratio, False)
                for feature, scale, index in zip(features, self.scales, order.split(per_level))
                if len(index) > 0
            ]
            pooled = torch.cat([p.to(features[0].dtype) for p in pooled])  # [K, out_h, out_w, C], level order
            # One scatter of the rows to their boxes; its backward is a multi-threaded gather (that of
            # index_select, index_add_, runs on one thread; a write per level would copy the gradient per level).
            out = torch.empty_like(pooled)
            out[order] = pooled
            return _to_nchw(out, features[0])


def use_fast_roi_align(model: torch.nn.Module) -> torch.nn.Module:
    """Swap the MultiScaleRoIAlign poolers of a torchvision R-CNN for FastMultiScaleRoIAlign, in place.

    The poolers have no parameters or buffers, so the state dict is unchanged. Returns the model.
    """
    for name in POOLER_NAMES:
        pool = getattr(model.roi_heads, name, None)
        if type(pool) is not MultiScaleRoIAlign:  # absent (None), already fast, or a custom pooler: leave it
            continue
        fast = FastMultiScaleRoIAlign(
            pool.featmap_names,
            pool.output_size,
            pool.sampling_ratio,
            canonical_scale=pool.canonical_scale,
            canonical_level=pool.canonical_level,
        )
        fast.scales, fast.map_levels = pool.scales, pool.map_levels  # set on the first forward, if it ran
        setattr(model.roi_heads, name, fast)
    return model
