from kvtier.engine.text import TextStream


def test_incomplete_utf8_is_held_back():
    stream = TextStream()
    euro = "€".encode()
    assert stream.push(b"a" + euro[:1]) == ("a", False)
    assert stream.push(euro[1:2]) == ("", False)
    assert stream.push(euro[2:]) == ("€", False)
    assert stream.text == "a€"


def test_stop_string_across_tokens_is_cut_and_never_sent():
    stream = TextStream(stop=("STOP",))
    assert stream.push(b"hello ST") == ("hello ", False)
    assert stream.push(b"O") == ("", False)
    assert stream.push(b"P and more") == ("", True)
    assert stream.text == "hello "


def test_held_prefix_that_does_not_become_a_stop_is_released():
    stream = TextStream(stop=("STOP",))
    assert stream.push(b"ST") == ("", False)
    assert stream.push(b"ar") == ("STar", False)
    assert stream.push(b"S") == ("", False)
    assert stream.finish() == "S"
    assert stream.text == "STarS"
