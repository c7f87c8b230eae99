"""The procedural scene set and its judge: seeded, held-out combinations kept out, every clause checked."""

import dataclasses

import numpy as np
import pytest

from pocketdiff.distill import judge, scenes


def test_scenes_are_seeded_and_random_access():
    assert scenes.scene_at(123) == scenes.scene_at(123)
    assert scenes.scene_at(123) != scenes.scene_at(123, seed=1)
    assert np.array_equal(scenes.training_set(8).images, scenes.training_set(8).images)
    counts = {f: 0 for f in scenes.FAMILIES}
    for i in range(600):
        counts[scenes.scene_at(i).prompt.family] += 1
    assert min(counts.values()) > 60  # each family about a sixth of training


def test_training_never_draws_a_held_out_combination():
    for i in range(3000):
        scene = scenes.scene_at(i)
        assert not {(t.colour, t.shape) for t in scene.things} & scenes.HELD_OUT_PAIRS, scene
        prompt = scene.prompt
        if prompt.family == "position":
            assert (prompt.objects[0][0], prompt.relation, prompt.objects[1][0]) not in scenes.HELD_OUT_POSITIONS
    for scene in scenes.evaluation_scenes("held_out", 16):
        prompt = scene.prompt
        named = {(c, s) for s, c in prompt.objects} & scenes.HELD_OUT_PAIRS
        assert named or (prompt.objects[0][0], prompt.relation, prompt.objects[1][0]) in scenes.HELD_OUT_POSITIONS


def test_evaluation_prompts_cover_every_family_equally():
    chosen = scenes.evaluation_scenes("in_distribution", 10)
    assert [s.prompt.family for s in chosen] == [f for f in scenes.FAMILIES for _ in range(10)]
    assert {w for s in chosen for w in s.prompt.caption.split()} <= {
        w for phrase in scenes.vocabulary_captions() for w in phrase.split()}


@pytest.mark.parametrize("split", ["in_distribution", "held_out"])
def test_judge_passes_renders_of_every_family(split):
    chosen = scenes.evaluation_scenes(split, 64)
    result = judge.geneval([judge.read(i) for i in scenes.render_set(chosen).images], chosen)
    assert result["overall"] >= 0.98 and min(result["families"].values()) >= 0.95, result


def _render(*things, prompt=None):
    return scenes.render(scenes.Scene(prompt, tuple(scenes.Thing(*t) for t in things)))


def test_judge_reads_shape_colour_count_and_place():
    image = _render(("circle", "red", 8, 8, 12), ("triangle", "blue", 24, 8, 12), ("cross", "green", 8, 24, 12),
                    ("square", "purple", 24, 24, 12))
    found = {(d.shape, d.colour, d.x > 16, d.y > 16) for d in judge.detect(image)}
    assert found == {("circle", "red", False, False), ("triangle", "blue", True, False),
                     ("cross", "green", False, True), ("square", "purple", True, True)}

    def passes(caption_family, objects, count=None, relation=None):
        return judge.satisfies(scenes.Prompt("", caption_family, objects, count, relation), judge.detect(image))

    assert passes("colors", (("circle", "red"),)) and not passes("colors", (("circle", "blue"),))
    assert passes("counting", (("square", None),), count=1) and not passes("counting", (("square", None),), count=2)
    assert passes("position", (("circle", None), ("triangle", None)), relation="left of")
    assert not passes("position", (("circle", None), ("triangle", None)), relation="right of")
    assert passes("position", (("circle", None), ("cross", None)), relation="above")
    assert passes("color_attr", (("circle", "red"), ("square", "purple")))
    assert not passes("color_attr", (("circle", "purple"), ("square", "red")))  # attributes swapped
    assert passes("two_objects", (("cross", None), ("triangle", None)))


def test_touching_objects_of_one_colour_do_not_count_twice():
    apart = _render(("square", "black", 8, 16, 10), ("square", "black", 24, 16, 10))
    touching = _render(("square", "black", 11, 16, 10), ("square", "black", 21, 16, 10))
    assert len(judge.detect(apart)) == 2 and len(judge.detect(touching)) == 1


def test_prompts_say_what_their_scenes_show():
    for i in range(300):
        scene = scenes.scene_at(i)
        prompt = scene.prompt
        assert judge.satisfies(prompt, [judge.Detection(t.shape, t.colour, t.x, t.y, 100) for t in scene.things])
        if prompt.count:
            assert len(scene.things) == prompt.count
        wrong = dataclasses.replace(prompt, objects=tuple((s, c) for s, c in prompt.objects[::-1]))
        if prompt.family == "position":  # the relation reversed no longer holds
            assert not judge.satisfies(wrong, [judge.Detection(t.shape, t.colour, t.x, t.y, 100) for t in scene.things])


def test_blobs_bars_rings_and_l_shapes_are_no_shape():
    from PIL import Image, ImageDraw

    def detected(draw):
        canvas = Image.new("RGB", (128, 128), "white")
        draw(ImageDraw.Draw(canvas), (20, 150, 50))
        return [d.shape for d in judge.detect(np.asarray(canvas.resize((32, 32), Image.Resampling.BOX)))]

    assert detected(lambda d, c: (d.rectangle((40, 40, 60, 96), fill=c), d.rectangle((40, 76, 96, 96), fill=c))) == [
        judge.UNKNOWN]
    assert detected(lambda d, c: (d.ellipse((30, 40, 70, 80), fill=c), d.ellipse((55, 40, 95, 80), fill=c))) == [
        judge.UNKNOWN]
    assert detected(lambda d, c: (d.ellipse((30, 30, 90, 90), fill=c), d.ellipse((45, 45, 75, 75), fill="white"))) == [
        judge.UNKNOWN]
    assert detected(lambda d, c: d.rectangle((20, 50, 100, 70), fill=c)) == [judge.UNKNOWN]
    assert detected(lambda d, c: d.ellipse((30, 30, 90, 90), fill=c)) == ["circle"]
