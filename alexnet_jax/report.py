"""What the result commands (``evaluate``, ``features``, ``transfer``) write: the numbers as JSON,
the tables as Markdown, the figures as PNG, and an ``index.html`` showing them together: local
paths or URLs alike (``storage``).
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from typing import Sequence

from matplotlib.figure import Figure

from alexnet_jax import storage


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  """A Markdown table; numbers as given (format them first), None as an em dash."""
  cell = lambda v: '—' if v is None else str(v)
  lines = ['| ' + ' | '.join(map(cell, header)) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(map(cell, row)) + ' |' for row in rows]
  return '\n'.join(lines)


def percent(x: float | None, digits: int = 1) -> str | None:
  """A fraction as a percentage, ``None`` (not applicable) kept."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return None
  return f'{100 * x:.{digits}f}'


def mean_std(values: Sequence[float], digits: int = 1) -> str:
  """``mean ± std`` of fractions, in percent (the std over the values, ddof=1; one value: no
  std)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return f'{100 * mean:.{digits}f}'
  std = math.sqrt(sum((v - mean)**2 for v in values) / (n - 1))
  return f'{100 * mean:.{digits}f} ± {100 * std:.{digits}f}'


def save_figure(fig: Figure, path: str) -> str:
  buffer = io.BytesIO()  # matplotlib writes local files or file objects, not epath paths
  fig.savefig(buffer, format='png', dpi=110, bbox_inches='tight')
  storage.write_bytes(path, buffer.getvalue())
  return path


class Report:
  """The files of one command's results in ``out_dir``: ``write`` them, then ``finish``."""

  def __init__(self, out_dir: str, title: str):
    self.out_dir = out_dir
    self.title = title
    self.sections: list[tuple[str, str]] = []  # (heading, markdown)
    self.figures: list[tuple[str, str]] = []  # (file, caption)
    self.files: list[str] = []
    storage.makedirs(out_dir)

  def path(self, name: str) -> str:
    return os.path.join(self.out_dir, name)

  def json(self, name: str, value) -> str:
    storage.write_text(self.path(name),
                       json.dumps(value, indent=1, default=_plain) + '\n', atomic=True)
    self.files.append(name)
    return self.path(name)

  def table(self, heading: str, markdown: str) -> None:
    self.sections.append((heading, markdown))

  def figure(self, fig: Figure, name: str, caption: str) -> str:
    save_figure(fig, self.path(name))
    self.figures.append((name, caption))
    return self.path(name)

  def markdown(self) -> str:
    parts = [f'# {self.title}']
    for heading, body in self.sections:
      parts += [f'## {heading}', body]
    for name, caption in self.figures:
      parts.append(f'![{caption}]({name})')
    return '\n\n'.join(parts) + '\n'

  def finish(self, markdown_name: str = 'results.md') -> str:
    """Writes the Markdown and the index.html; returns the index's path."""
    storage.write_text(self.path(markdown_name), self.markdown(), atomic=True)
    self.files.append(markdown_name)
    page = [
        '<!doctype html><html><head><meta charset="utf-8">'
        f'<title>{html.escape(self.title)}</title><style>body{{font-family:sans-serif;'
        'max-width:1400px;margin:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;'
        'padding:2px 8px;text-align:right}img{max-width:100%}figcaption{color:#333}</style>'
        f'</head><body><h1>{html.escape(self.title)}</h1>'
    ]
    for heading, body in self.sections:
      page.append(f'<h2>{html.escape(heading)}</h2>{_markdown_to_html(body)}')
    for name, caption in self.figures:
      page.append(f'<figure><a href="{html.escape(name)}"><img src="{html.escape(name)}" '
                  f'alt="{html.escape(caption)}"></a><figcaption>{html.escape(caption)}'
                  '</figcaption></figure>')
    links = ', '.join(f'<a href="{html.escape(f)}">{html.escape(f)}</a>' for f in self.files)
    page.append(f'<p>Files: {links}</p></body></html>')
    index = self.path('index.html')
    storage.write_text(index, '\n'.join(page))
    return index


def _markdown_to_html(body: str) -> str:
  """The tables and paragraphs this module writes (not general Markdown)."""
  out, rows = [], []

  def flush():
    if rows:
      head, *rest = rows
      out.append('<table><tr>' + ''.join(f'<th>{html.escape(c)}</th>' for c in head) + '</tr>' +
                 ''.join('<tr>' + ''.join(f'<td>{html.escape(c)}</td>'
                                          for c in r) + '</tr>'
                         for r in rest) + '</table>')
      rows.clear()

  for line in body.splitlines():
    if line.startswith('|'):
      cells = [c.strip() for c in line.strip().strip('|').split('|')]
      if not all(set(c) <= set('-:') for c in cells):
        rows.append(cells)
    else:
      flush()
      if line.strip():
        out.append(f'<p>{html.escape(line)}</p>')
  flush()
  return '\n'.join(out)


def _plain(value):
  """JSON for NumPy scalars and arrays."""
  if hasattr(value, 'tolist'):
    return value.tolist()
  raise TypeError(f'{type(value).__name__} is not JSON serialisable')
