/* The example page's "mark a missed span" form: selecting words inside one message's text fills the
   form's segment/start/end and enables its button. A static file (not an inline script) so that the
   Content-Security-Policy never needs 'unsafe-inline' for it. Elements are looked up on every event:
   the page's <main> may be swapped by HTMX while the example is re-scanned. */
(function () {
  "use strict";
  function offsetIn(container, node, offset) {
    const range = document.createRange();
    range.selectNodeContents(container);
    range.setEnd(node, offset);
    return range.toString().length;
  }
  document.addEventListener("selectionchange", function () {
    const form = document.getElementById("mark-form");
    const label = document.getElementById("mark-selection");
    const button = document.getElementById("mark-button");
    if (!form || !label || !button) { return; }
    const sel = window.getSelection();
    if (!sel || sel.rangeCount === 0 || sel.isCollapsed) { return; }
    const r = sel.getRangeAt(0);
    const a = r.startContainer.parentElement && r.startContainer.parentElement.closest(".bubble-text");
    const b = r.endContainer.parentElement && r.endContainer.parentElement.closest(".bubble-text");
    if (!a || a !== b) { button.disabled = true; label.textContent = "Select words inside one message"; return; }
    const start = offsetIn(a, r.startContainer, r.startOffset);
    const end = offsetIn(a, r.endContainer, r.endOffset);
    if (end <= start) { return; }
    form.segment.value = a.dataset.segment; form.start.value = start; form.end.value = end;
    label.textContent = "Selected: “" + sel.toString().slice(0, 60) + "”";
    button.disabled = false;
  });
})();
