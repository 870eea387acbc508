"""The region table: boxes drawn on the canvas become the rows `loraclr generate --region` reads."""

from __future__ import annotations

import pytest

from loraclr.regional import parse_region
from loraclr.ui import boxes


def test_drawn_box_is_normalised_clipped_and_snapped():
    rows = boxes.add_box([], [0.6, 1.2, 0.1234567, 0.3])  # dragged up and left, past the bottom edge
    assert rows == [[0.123, 0.3, 0.6, 1.0, ""]]


def test_a_click_draws_nothing():
    assert boxes.add_box([[0, 0, 1, 1, "x"]], [0.5, 0.5, 0.505, 0.9]) == [[0, 0, 1, 1, "x"]]
    assert boxes.add_box([], None) == []


def test_rows_become_the_command_regions():
    rows = [[0, 0.25, 0.5, 1, "a <rubo1> creature: left"], ["", "", "", "", ""], [0.5, 0.25, 1.0, 1.0, "b"]]
    args = boxes.region_arguments(rows)
    assert args == ["--region", "0,0.25,0.5,1:a <rubo1> creature: left", "--region", "0.5,0.25,1,1:b"]
    parsed = [parse_region(a) for a in args[1::2]]
    assert parsed[0].box == (0, 0.25, 0.5, 1) and parsed[0].prompt == "a <rubo1> creature: left"
    assert parsed[1].box == (0.5, 0.25, 1, 1)


def test_a_bad_cell_reaches_the_command_as_typed():
    args = boxes.region_arguments([["left", 0, 0.5, 1, "x"]])
    with pytest.raises(ValueError, match="four numbers"):
        parse_region(args[1])


def test_canvas_draws_the_rows_in_percent():
    drawn = boxes.canvas_boxes([[0, 0.25, 0.5, 1, "a"], [0.1, "?", 0.2, 0.3, "not a box yet"], [0.5, 0.25, 1, 1, ""]])
    assert drawn == [{"n": 1, "left": 0.0, "top": 25.0, "width": 50.0, "height": 75.0, "label": "1: a"},
                     {"n": 3, "left": 50.0, "top": 25.0, "width": 50.0, "height": 75.0, "label": "3"}]


def test_insert_text_goes_into_the_chosen_region():
    rows = boxes.insert_text([[0, 0, 0.5, 1, "on the left"], [0.5, 0, 1, 1, ""]], 2, "a <rika1> creature")
    assert rows[1][4] == "a <rika1> creature" and rows[0][4] == "on the left"
    with pytest.raises(ValueError, match="there are 2 regions"):
        boxes.insert_text(rows, 3, "x")


def test_canvas_shows_the_last_image_behind_the_boxes():
    import base64
    import io

    from PIL import Image

    from loraclr.ui.canvas import canvas_value, data_uri

    assert canvas_value([[0, 0, 1, 1, "a"]]) == {"boxes": boxes.canvas_boxes([[0, 0, 1, 1, "a"]]), "image": ""}
    image = Image.new("RGB", (8, 8), (10, 200, 30))
    uri = data_uri(image)
    assert uri.startswith("data:image/png;base64,")
    back = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert back.getpixel((3, 3)) == (10, 200, 30)
    assert canvas_value([], uri)["image"] == uri
