"""Control images that need no model of their own: Canny edges, a supplied depth map normalised
and the normals it implies, and a scribble of a layout's boxes. IMAGE in, IMAGE out (NHWC, 0..1).

- `canny`: Canny's detector (Canny, "A Computational Approach to Edge Detection") as OpenCV's
  `cv2.Canny(image, low, high)` runs it, which is what ControlNet's canny models were trained on:
  3x3 Sobel gradients of the 0..255 gray image with no smoothing first, their L1 magnitude,
  non-maximum suppression across the edge, then hysteresis (edges start above `high` and continue
  through pixels above `low`). Written here with torch: OpenCV is not a dependency, Pillow has no
  Canny, and scikit-image's always smooths and scales its thresholds otherwise. Where the two
  pixels either side of a step tie, the brighter one is the edge, so a shape's edge lies on its
  own outermost pixels on every side.
- `normalised_depth` / `normals_from_depth`: a depth image (brighter is nearer, as ControlNet's
  depth models read MiDaS' inverse depth) stretched to 0..1, and the surface normals of that
  height field by central differences (torch.gradient), as a normal map: red faces right, green
  up, blue the viewer.
- `layout_scribble`: a LAYOUT's boxes, rasterised as the layout techniques rasterise them
  (kernels.layout.boxes.box_mask), as outlines or filled, white on black.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as OpenCV's RGB -> gray
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
# (dx, dy) of the neighbour in each of 8 gradient directions, 45 degrees apart (y points down)
DIRECTIONS = ((1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1))


def gray(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W) luma of NHWC images (a one-channel image is its own)."""
    if images.shape[-1] == 1:
        return images[..., 0].float()
    weights = torch.tensor(GRAY_WEIGHTS, dtype=torch.float32)
    return images[..., :3].float() @ weights


def as_image(plane: torch.Tensor) -> torch.Tensor:
    """(N, H, W) in 0..1 as a 3-channel IMAGE."""
    return plane.unsqueeze(-1).expand(*plane.shape, 3).contiguous()


def sobel(plane: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gx, gy) of (N, H, W) by 3x3 Sobel kernels, the border replicated."""
    kx = torch.tensor(SOBEL_X, dtype=torch.float32)
    kernels = torch.stack([kx, kx.t()])[:, None]
    padded = F.pad(plane[:, None], (1, 1, 1, 1), mode="replicate")
    g = F.conv2d(padded, kernels)
    return g[:, 0], g[:, 1]


def neighbours(plane: torch.Tensor) -> torch.Tensor:
    """(N, 8, H, W): each pixel's neighbour in each of DIRECTIONS (0 beyond the border)."""
    h, w = plane.shape[1:]
    padded = F.pad(plane, (1, 1, 1, 1))
    return torch.stack([padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dx, dy in DIRECTIONS], dim=1)


def thin_edges(gx: torch.Tensor, gy: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Non-maximum suppression: pixels whose magnitude is a maximum across the edge. Ties go to
    the pixel on the brighter side (strictly above its uphill neighbour, at least its downhill one)."""
    angle = torch.atan2(gy, gx)
    uphill = torch.remainder(torch.round(angle / (torch.pi / 4)).long(), 8)
    downhill = (uphill + 4) % 8
    around = neighbours(magnitude)
    up = around.gather(1, uphill[:, None])[:, 0]
    down = around.gather(1, downhill[:, None])[:, 0]
    return (magnitude > 0) & (magnitude > up) & (magnitude >= down)


def hysteresis(strong: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
    """Grow `strong` through 8-connected `weak` pixels until nothing changes."""
    edges = strong & weak
    while True:
        grown = weak & (F.max_pool2d(edges[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0)
        grown |= edges
        if torch.equal(grown, edges):
            return edges
        edges = grown


def canny(images: torch.Tensor, low: float = 100.0, high: float = 200.0) -> torch.Tensor:
    """Canny edges of NHWC images in 0..1, white on black; thresholds on the 0..255 scale of the
    L1 Sobel magnitude, as cv2.Canny's."""
    if low > high:
        raise ValueError(f"the low threshold ({low}) must not exceed the high one ({high})")
    gx, gy = sobel(gray(images) * 255.0)
    magnitude = gx.abs() + gy.abs()
    thin = thin_edges(gx, gy, magnitude)
    edges = hysteresis(thin & (magnitude > high), thin & (magnitude > low))
    return as_image(edges.float())


def normalised_depth(images: torch.Tensor, invert: bool = False) -> torch.Tensor:
    """(N, H, W) depth in 0..1 from a supplied depth image: its luma stretched so each image's
    farthest pixel is 0 and nearest 1 (flipped first with `invert`); a flat image gives zeros."""
    depth = gray(images)
    if invert:
        depth = 1.0 - depth
    lo = depth.amin(dim=(1, 2), keepdim=True)
    span = depth.amax(dim=(1, 2), keepdim=True) - lo
    return torch.where(span > 0, (depth - lo) / span.clamp_min(1e-12), torch.zeros_like(depth))


def normals_from_depth(depth: torch.Tensor, strength: float = 4.0) -> torch.Tensor:
    """The normal map (NHWC in 0..1) of the height field z = strength * depth, depth (N, H, W) in
    0..1 and x, y measured in image widths and heights: n = normalise(-dz/dx, dz/dy_down, 1)
    (green is up), mapped from -1..1 to 0..1."""
    n, h, w = depth.shape
    dz_dy, dz_dx = torch.gradient(depth.float() * strength, dim=(1, 2))
    normal = torch.stack([-dz_dx * w, dz_dy * h, torch.ones_like(depth, dtype=torch.float32)], dim=-1)
    normal = normal / normal.norm(dim=-1, keepdim=True)
    return (normal + 1.0) / 2.0


def layout_scribble(layout: dict, width: int, height: int, *, filled: bool = False,
                    line_width: int = 4) -> torch.Tensor:
    """A (1, height, width, 3) image of the layout's boxes: white outlines `line_width` pixels wide
    just inside each box (or the boxes filled) on black."""
    from kernels.layout.boxes import box_mask

    canvas = torch.zeros(height, width)
    r = max(1, int(line_width))
    for box in (layout or {}).get("boxes", []):
        mask = box_mask(box, height, width)
        if not filled:  # the box minus its erosion by r pixels; beyond the image counts as outside
            outside = F.pad(1.0 - mask[None, None], (r, r, r, r), value=1.0)
            eroded = 1.0 - F.max_pool2d(outside, 2 * r + 1, stride=1)[0, 0]
            mask = mask - eroded
        canvas = torch.maximum(canvas, mask)
    return as_image(canvas[None])
