"""Snippets the browser tests share."""

# Selects `word` in the first message of an example page with the mouse's API (a Range), as a curator
# does before "Mark as personal data": the page's selection script then fills in the mark form.
SELECT_WORD = """(word) => {
    const el = document.querySelector('.bubble-text[data-segment="0"]');
    const text = el.firstChild;
    const start = text.textContent.indexOf(word);
    const range = document.createRange();
    range.setStart(text, start);
    range.setEnd(text, start + word.length);
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
}"""
