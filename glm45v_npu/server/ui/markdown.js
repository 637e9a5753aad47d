"use strict";
// Markdown -> DOM nodes, built with createElement and textContent only: the model's output is untrusted, and
// nothing in it is ever parsed as HTML. Grounding boxes arrive as \uE000text\uE001 (see app.js) with their indexes.
const Markdown = (() => {
  const BOX_OPEN = "\uE000", BOX_CLOSE = "\uE001";
  const SAFE_URL = /^(https?:|mailto:)/i;
  const INLINE = /`([^`]+)`|\uE000([^\uE001]*)\uE001?|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*|\b_([^_\s][^_]*)_\b|\[([^\]]+)\]\(([^)\s]+)\)/g;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function inline(parent, text, refs) {
    let at = 0, m;
    INLINE.lastIndex = 0;
    const matches = [];
    while ((m = INLINE.exec(text)) !== null) matches.push([m.index, m[0].length, m.slice(1)]);
    for (const [index, length, g] of matches) {
      if (index > at) parent.appendChild(document.createTextNode(text.slice(at, index)));
      const [code, box, bold, em1, em2, label, url] = g;
      if (code !== undefined) parent.appendChild(el("code", "", code));
      else if (box !== undefined) {
        const span = el("span", "box-ref");
        const ids = refs.shift() || [];
        if (ids.length) span.appendChild(el("span", "index", ids.map((k) => "#" + (k + 1)).join(" ")));
        span.appendChild(document.createTextNode(box));
        parent.appendChild(span);
      } else if (bold !== undefined) inline(parent.appendChild(el("strong")), bold, refs);
      else if (em1 !== undefined || em2 !== undefined) inline(parent.appendChild(el("em")), em1 ?? em2, refs);
      else if (SAFE_URL.test(url)) {
        const a = el("a");
        a.href = url;
        a.target = "_blank";
        a.rel = "noopener noreferrer nofollow";
        inline(a, label, refs);
        parent.appendChild(a);
      } else parent.appendChild(document.createTextNode(`[${label}](${url})`));
      at = index + length;
    }
    if (at < text.length) parent.appendChild(document.createTextNode(text.slice(at)));
  }

  function lines(parent, textLines, refs) {
    textLines.forEach((line, k) => {
      if (k) parent.appendChild(el("br"));
      inline(parent, line, refs);
    });
  }

  const FENCE = /^\s*```/, HEADING = /^(#{1,6})\s+(.*)$/, BULLET = /^\s*[-*+]\s+(.*)$/, NUMBERED = /^\s*\d+[.)]\s+(.*)$/;
  const QUOTE = /^>\s?(.*)$/, RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
  const startsBlock = (l) => FENCE.test(l) || HEADING.test(l) || BULLET.test(l) || NUMBERED.test(l) || QUOTE.test(l);

  function blocks(parent, text, refs) {
    const ls = text.split("\n");
    let i = 0;
    while (i < ls.length) {
      const line = ls[i];
      if (FENCE.test(line)) {
        const lang = line.replace(/^\s*```/, "").trim().replace(/[^\w+-]/g, "");
        const body = [];
        for (i++; i < ls.length && !FENCE.test(ls[i]); i++) body.push(ls[i]);
        i++;
        const pre = el("pre"), code = el("code", lang ? "language-" + lang : "");
        code.textContent = body.join("\n").replaceAll(BOX_OPEN, "").replaceAll(BOX_CLOSE, "");
        pre.appendChild(code);
        parent.appendChild(pre);
      } else if (HEADING.test(line)) {
        const [, hashes, rest] = line.match(HEADING);
        inline(parent.appendChild(el("h" + Math.min(6, hashes.length + 2))), rest, refs);
        i++;
      } else if (BULLET.test(line) || NUMBERED.test(line)) {
        const kind = BULLET.test(line) ? BULLET : NUMBERED;
        const list = parent.appendChild(el(kind === BULLET ? "ul" : "ol"));
        for (; i < ls.length && kind.test(ls[i]); i++) inline(list.appendChild(el("li")), ls[i].match(kind)[1], refs);
      } else if (QUOTE.test(line)) {
        const quoted = [];
        for (; i < ls.length && QUOTE.test(ls[i]); i++) quoted.push(ls[i].match(QUOTE)[1]);
        blocks(parent.appendChild(el("blockquote")), quoted.join("\n"), refs);
      } else if (RULE.test(line)) {
        parent.appendChild(el("hr"));
        i++;
      } else if (!line.trim()) {
        i++;
      } else {
        const para = [];
        for (; i < ls.length && ls[i].trim() && !startsBlock(ls[i]) && !RULE.test(ls[i]); i++) para.push(ls[i]);
        lines(parent.appendChild(el("p")), para, refs);
      }
    }
  }

  // refs: per box-marker pair in order, the indexes of the boxes it holds (may be empty)
  function render(text, refs) {
    const fragment = document.createDocumentFragment();
    blocks(fragment, text, [...(refs || [])]);
    return fragment;
  }

  return { render, BOX_OPEN, BOX_CLOSE };
})();
