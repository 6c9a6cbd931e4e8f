"""The ``openpose`` preprocessor (``body_pose_model.pth``): OpenPose's body network and its bottom-up parsing
("Realtime multi-person 2D pose estimation using part affinity fields", Cao et al. 2017) as ControlNet's annotator
runs it. A VGG-19 front and six two-branch stages predict 19 keypoint heatmaps and 38 part-affinity-field channels
at 1/8 scale; keypoints are the heatmaps' smoothed local maxima, limbs the keypoint pairs whose line the affinity
field supports, people the limbs joined greedily; the map is every person's skeleton drawn on black (the 18
COCO-order joints and 17 limbs in the annotator's colours). Layer names as the file's (``conv1_1``,
``Mconv7_stage6_L2`` ...), so it loads strictly."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

BOX_SIZE, STRIDE, PAD_VALUE = 368, 8, 128  # the net sees the image at 0.5 * 368 / height (one scale)
PEAK_THRESHOLD, AFFINITY_THRESHOLD, SAMPLES = 0.1, 0.05, 10
# limbs as 1-based joint pairs (neck = 2), and each limb's two affinity-field channels (offset by 19)
LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
         (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18)]
AFFINITY = [(31, 32), (39, 40), (33, 34), (35, 36), (41, 42), (43, 44), (19, 20), (21, 22), (23, 24), (25, 26),
            (27, 28), (29, 30), (47, 48), (49, 50), (53, 54), (51, 52), (55, 56), (37, 38), (45, 46)]
COLOURS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
           (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
           (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
_FRONT = [("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), "pool", ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3),
          "pool", ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3),
          ("conv3_4", 256, 256, 3), "pool", ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3),
          ("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3)]


def _stage(stage: int, branch: int, out: int) -> list[tuple[str, int, int, int] | str]:
    if stage == 1:
        names = [f"conv5_{i}_CPM_L{branch}" for i in range(1, 6)]
        return [(names[0], 128, 128, 3), (names[1], 128, 128, 3), (names[2], 128, 128, 3), (names[3], 128, 512, 1),
                (names[4], 512, out, 1)]
    names = [f"Mconv{i}_stage{stage}_L{branch}" for i in range(1, 8)]
    return [(names[0], 185, 128, 7), *[(n, 128, 128, 7) for n in names[1:5]], (names[5], 128, 128, 1),
            (names[6], 128, out, 1)]


class _Layers(nn.Module):
    """Convolutions (same padding) each followed by a ReLU, max pools; the last convolution's ReLU optional."""

    def __init__(self, spec: list, last_relu: bool) -> None:
        super().__init__()
        self.steps: list[tuple[str | None, bool]] = []  # (convolution name or None for a pool, ReLU after it)
        for i, item in enumerate(spec):
            if item == "pool":
                self.steps.append((None, False))
                continue
            name, cin, cout, k = item
            self.add_module(name, nn.Conv2d(cin, cout, k, padding=k // 2))
            self.steps.append((name, i < len(spec) - 1 or last_relu))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, relu in self.steps:
            x = nn.functional.max_pool2d(x, 2, 2) if name is None else getattr(self, name)(x)
            x = torch.relu(x) if relu else x
        return x


class BodyPoseNet(nn.Module):
    """(1, 3, H, W) BGR / 256 - 0.5 -> (affinity fields (1, 38, H/8, W/8), heatmaps (1, 19, H/8, W/8)). As in the
    published model, the last stage's heatmap branch keeps its ReLU (the other stages' output layers have none)."""

    def __init__(self) -> None:
        super().__init__()
        self.front = _Layers(_FRONT, last_relu=True)
        self.stages = nn.ModuleList(nn.ModuleList([_Layers(_stage(s, 1, 38), False),
                                                   _Layers(_stage(s, 2, 19), s == 6)]) for s in range(1, 7))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.front(x)
        inputs = features
        for fields_branch, heat_branch in self.stages:
            fields, heat = fields_branch(inputs), heat_branch(inputs)
            inputs = torch.cat([fields, heat, features], 1)
        return fields, heat

    def load_flat(self, state: dict[str, torch.Tensor]) -> None:
        """The file's flat names (``conv1_1.weight``) onto this module's, strictly."""
        ours = {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]: name for name in self.state_dict()}
        missing, extra = set(ours) - set(state), set(state) - set(ours)
        if missing or extra:
            raise ValueError(f"not an OpenPose body model: {len(missing)} missing / {len(extra)} unexpected tensors "
                             f"(e.g. {sorted(missing or extra)[0]})")
        self.load_state_dict({ours[k]: v for k, v in state.items()}, strict=True)


def _resize(cv2, x: np.ndarray, width: int, height: int, k: float) -> np.ndarray:
    """The annotator's resize: area when shrinking, Lanczos-4 otherwise, channel by channel beyond 3 channels."""
    mode = cv2.INTER_AREA if k < 1 else cv2.INTER_LANCZOS4
    if x.ndim == 2 or x.shape[2] == 3:
        return cv2.resize(x, (width, height), interpolation=mode)
    return np.stack([cv2.resize(x[:, :, c], (width, height), interpolation=mode) for c in range(x.shape[2])], 2)


def _maps(net: BodyPoseNet, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 19) heatmaps and (H, W, 38) affinity fields at the image's size (float64)."""
    import cv2

    h, w = bgr.shape[:2]
    scale = 0.5 * BOX_SIZE / h
    small = _resize(cv2, bgr, int(w * scale), int(h * scale), scale)
    pad_h, pad_w = -small.shape[0] % STRIDE, -small.shape[1] % STRIDE
    padded = np.pad(small, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=PAD_VALUE)
    x = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)[None], dtype=np.float32) / 256 - 0.5)
    with torch.no_grad():
        fields, heat = (t[0].permute(1, 2, 0).numpy() for t in net(x))
    out = []
    for m in (heat, fields):
        up = _resize(cv2, m, m.shape[1] * STRIDE, m.shape[0] * STRIDE, STRIDE)
        up = up[:padded.shape[0] - pad_h, :padded.shape[1] - pad_w]
        out.append(_resize(cv2, up, w, h, (h + w) / (up.shape[0] + up.shape[1])).astype(np.float64))
    return out[0], out[1]


def _peaks(heat: np.ndarray) -> list[list[tuple[float, float, float, int]]]:
    """Per joint: (x, y, score, id) at the local maxima (4-neighbourhood) of the heatmap smoothed by a Gaussian of
    sigma 3, above 0.1; ids count across joints."""
    from scipy.ndimage import gaussian_filter

    peaks, count = [], 0
    for part in range(18):
        raw = heat[:, :, part]
        smooth = gaussian_filter(raw, sigma=3)
        padded = np.pad(smooth, 1)  # zeros beyond the border, as the annotator's shifted copies
        centre = padded[1:-1, 1:-1]
        is_peak = ((centre >= padded[:-2, 1:-1]) & (centre >= padded[2:, 1:-1]) & (centre >= padded[1:-1, :-2])
                   & (centre >= padded[1:-1, 2:]) & (centre > PEAK_THRESHOLD))
        ys, xs = np.nonzero(is_peak)
        peaks.append([(float(x), float(y), float(raw[y, x]), count + i) for i, (x, y) in enumerate(zip(xs, ys))])
        count += len(xs)
    return peaks


def _limbs(peaks: list, fields: np.ndarray, height: int) -> list[np.ndarray | None]:
    """Per limb: rows (id A, id B, score, index A, index B), the best-scoring pairs first, each joint used once."""
    found: list[np.ndarray | None] = []
    for (a, b), channels in zip(LIMBS, AFFINITY, strict=True):
        cand_a, cand_b = peaks[a - 1], peaks[b - 1]
        if not cand_a or not cand_b:
            found.append(None)
            continue
        field = fields[:, :, [channels[0] - 19, channels[1] - 19]]
        scored = []
        for i, pa in enumerate(cand_a):
            for j, pb in enumerate(cand_b):
                vec = np.subtract(pb[:2], pa[:2])
                norm = max(0.001, math.sqrt(vec[0] ** 2 + vec[1] ** 2))
                vec = vec / norm
                xs = np.round(np.linspace(pa[0], pb[0], SAMPLES)).astype(int)
                ys = np.round(np.linspace(pa[1], pb[1], SAMPLES)).astype(int)
                along = field[ys, xs, 0] * vec[0] + field[ys, xs, 1] * vec[1]
                score = sum(along) / len(along) + min(0.5 * height / norm - 1, 0)
                if len(np.nonzero(along > AFFINITY_THRESHOLD)[0]) > 0.8 * len(along) and score > 0:
                    scored.append((i, j, score))
        scored.sort(key=lambda c: c[2], reverse=True)
        rows = np.zeros((0, 5))
        for i, j, score in scored:
            if i not in rows[:, 3] and j not in rows[:, 4]:
                rows = np.vstack([rows, [cand_a[i][3], cand_b[j][3], score, i, j]])
                if len(rows) >= min(len(cand_a), len(cand_b)):
                    break
        found.append(rows)
    return found


def _people(limbs: list, candidate: np.ndarray) -> np.ndarray:
    """(n, 20): per person the candidate index of each of 18 joints (-1: none), the total score, the joint count.
    The annotator's greedy assembly, its merge rule included; people with < 4 joints or a mean score < 0.4 go."""
    people = -1 * np.ones((0, 20))
    for k, rows in enumerate(limbs):
        if rows is None:
            continue
        a, b = LIMBS[k][0] - 1, LIMBS[k][1] - 1
        for row in rows:
            part_a, part_b = row[0], row[1]
            owners = [p for p in range(len(people)) if people[p][a] == part_a or people[p][b] == part_b][:2]
            if len(owners) == 1 or (len(owners) == 2 and np.any(
                    ((people[owners[0]] >= 0).astype(int) + (people[owners[1]] >= 0).astype(int))[:-2] == 2)):
                p = owners[0]
                if len(owners) == 2 or people[p][b] != part_b:
                    people[p][b] = part_b
                    people[p][-1] += 1
                    people[p][-2] += candidate[int(part_b), 2] + row[2]
            elif len(owners) == 2:  # two disjoint people joined by this limb: merge them
                p, q = owners
                people[p][:-2] += people[q][:-2] + 1
                people[p][-2:] += people[q][-2:]
                people[p][-2] += row[2]
                people = np.delete(people, q, 0)
            elif k < 17:
                person = -1 * np.ones(20)
                person[a], person[b], person[-1] = part_a, part_b, 2
                person[-2] = sum(candidate[row[:2].astype(int), 2]) + row[2]
                people = np.vstack([people, person])
    keep = [p for p in range(len(people)) if people[p][-1] >= 4 and people[p][-2] / people[p][-1] >= 0.4]
    return people[keep]


def detect_people(net: BodyPoseNet, pixels: np.ndarray) -> list[list[tuple[float, float] | None]]:
    """(H, W, 3) uint8 RGB -> per person its 18 joints (x, y in pixels, or None)."""
    bgr = np.ascontiguousarray(pixels[:, :, ::-1])
    heat, fields = _maps(net, bgr)
    peaks = _peaks(heat)
    candidate = np.array([p for joint in peaks for p in joint]) if any(peaks) else np.zeros((0, 4))
    people = _people(_limbs(peaks, fields, bgr.shape[0]), candidate)
    return [[(candidate[int(i)][0], candidate[int(i)][1]) if i != -1 else None for i in person[:18]]
            for person in people]


def draw_people(people: list[list[tuple[float, float] | None]], height: int, width: int) -> np.ndarray:
    """The annotator's drawing: limbs as ellipses (half width 4) in 60 % of their colour, joints as discs of
    radius 4, person after person, on a black (height, width, 3) canvas."""
    import cv2

    canvas = np.zeros((height, width, 3), np.uint8)
    for joints in people:
        for (a, b), colour in zip(LIMBS[:17], COLOURS, strict=False):
            ja, jb = joints[a - 1], joints[b - 1]
            if ja is None or jb is None:
                continue
            xs = np.array([ja[0] / width, jb[0] / width]) * float(width)  # through [0, 1] as the annotator
            ys = np.array([ja[1] / height, jb[1] / height]) * float(height)
            length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
            polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), 4), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in colour])
        for joint, colour in zip(joints, COLOURS, strict=True):
            if joint is not None:
                cv2.circle(canvas, (int(joint[0] / width * width), int(joint[1] / height * height)), 4, colour,
                           thickness=-1)
    return canvas


def openpose(net: BodyPoseNet, pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8: the people's skeletons on black."""
    return draw_people(detect_people(net, pixels), *pixels.shape[:2])
