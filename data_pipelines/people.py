"""People in a video: the faces found on its sampled frames linked into tracks, one per person.

Linking is by position and size only (no identity features): on each sampled frame, faces are assigned
to the people seen before by the Hungarian method (scipy), a face joining a person when its centre lies
within MAX_CENTRE_SHIFT face widths of where that person was last seen and its size is within
MAX_SIZE_RATIO of theirs; other faces start new people. A person stays known after leaving the frame,
so someone who comes back near where they left rejoins their own track. Two people who swap places
between two sampled frames would be swapped too (a limit of linking by position).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import scipy.optimize

from data_pipelines.faces import Box

# A face joins a person seen before when its centre moved at most this many face widths from where
# that person was last seen (sampled frames are about a third of a second apart in a 10 s video) ...
MAX_CENTRE_SHIFT = 1.0
# ... and its width changed by at most this factor.
MAX_SIZE_RATIO = 1.8
# A person counts (is judged) when seen on at least this share of the frames of the person seen most
# (and on at least MIN_PERSON_FRAMES frames, unless they are that person): shorter tracks are mostly
# false detections, or faces glimpsed too briefly to judge.
MIN_PERSON_SHARE = 0.25
MIN_PERSON_FRAMES = 2


@dataclasses.dataclass
class Person:
    """One face followed across sampled frames: ``samples`` index the frames of the list linked, in order."""

    samples: list[int] = dataclasses.field(default_factory=list)
    boxes: list[Box] = dataclasses.field(default_factory=list)

    @property
    def first_box(self) -> Box:
        """Where the person was first seen."""
        return self.boxes[0]


def _match_cost(box: Box, last_box: Box) -> float:
    """How far ``box`` is from a person last seen at ``last_box`` (inf when it cannot be them)."""
    x, y, w, h = box
    last_x, last_y, last_w, last_h = last_box
    width = max(w, last_w, 1)
    shift = np.hypot(x + w / 2 - last_x - last_w / 2, y + h / 2 - last_y - last_h / 2) / width
    size_ratio = max(w, last_w) / max(1, min(w, last_w))
    if shift > MAX_CENTRE_SHIFT or size_ratio > MAX_SIZE_RATIO:
        return np.inf
    return shift + (size_ratio - 1.0)


def link_people(boxes_per_sample: Sequence[Sequence[Box]]) -> list[Person]:
    """Every person seen: ``boxes_per_sample[i]`` are the faces found on sampled frame i."""
    people: list[Person] = []
    for sample, boxes in enumerate(boxes_per_sample):
        if not boxes:
            continue
        costs = np.array([[_match_cost(box, person.boxes[-1]) for person in people] for box in boxes]
                         ).reshape(len(boxes), len(people))
        matched: dict[int, int] = {}
        if people:
            finite = np.where(np.isfinite(costs), costs, 1e9)
            for box_index, person_index in zip(*scipy.optimize.linear_sum_assignment(finite)):
                if np.isfinite(costs[box_index, person_index]):
                    matched[box_index] = person_index
        for box_index, box in enumerate(boxes):
            if box_index in matched:
                person = people[matched[box_index]]
            else:
                person = Person()
                people.append(person)
            person.samples.append(sample)
            person.boxes.append(tuple(box))
    return people


def people_to_judge(people: Sequence[Person]) -> list[Person]:
    """The people seen on enough frames to be judged (MIN_PERSON_SHARE, MIN_PERSON_FRAMES), in the order
    they were first seen; the person seen most always counts."""
    if not people:
        return []
    most = max(len(person.samples) for person in people)
    return [person for person in people
            if len(person.samples) == most
            or (len(person.samples) >= MIN_PERSON_FRAMES and len(person.samples) >= MIN_PERSON_SHARE * most)]
