"""A small DOM reader for the report tests that do not start a browser: every element of an
HTML page with its attributes and its text (the browser tests read the real DOM instead)."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser

_VOID = {"meta", "img", "br", "hr", "input", "link"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    text: list[str] = field(default_factory=list)

    @property
    def content(self) -> str:
        return "".join(self.text).strip()


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self.open: list[Element] = []

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.elements.append(element)
        if tag not in _VOID:
            self.open.append(element)

    def handle_startendtag(self, tag, attrs):
        self.elements.append(Element(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        for index in range(len(self.open) - 1, -1, -1):
            if self.open[index].tag == tag:
                del self.open[index:]
                break

    def handle_data(self, data):
        for element in self.open:
            element.text.append(data)


def elements(page: str) -> list[Element]:
    collector = _Collector()
    collector.feed(page)
    return collector.elements


def with_attr(page: str | list[Element], name: str, value: str | None = None) -> list[Element]:
    found = elements(page) if isinstance(page, str) else page
    return [e for e in found if name in e.attrs and (value is None or e.attrs[name] == value)]
