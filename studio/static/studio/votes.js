/* Blind review page: keyboard shortcuts. 1–4 choose a verdict, Enter submits it (Ctrl/⌘+Enter also from
   the comment box). Without this file every button still votes with one click. */
(function () {
  "use strict";

  function typing(target) {
    return target && (target.tagName === "TEXTAREA" || target.tagName === "INPUT" || target.tagName === "SELECT" ||
      target.isContentEditable);
  }

  function setup() {
    var form = document.querySelector("[data-vote-form]");
    if (!form) { return; }
    var buttons = Array.prototype.slice.call(form.querySelectorAll("[data-vote-key]"));
    var selected = form.querySelector(".vote-button.is-selected");

    function select(button) {
      buttons.forEach(function (b) {
        var on = b === button;
        b.classList.toggle("is-selected", on);
        b.setAttribute("aria-pressed", on ? "true" : "false");
      });
      selected = button;
      button.focus();
    }

    function submit() {
      if (!selected || form.getAttribute("data-submitting")) { return; }
      form.setAttribute("data-submitting", "");  // one submit per page, even on a held-down Enter
      if (form.requestSubmit) { form.requestSubmit(selected); } else { selected.click(); }
    }

    buttons.forEach(function (b) { b.setAttribute("aria-pressed", b === selected ? "true" : "false"); });
    form.addEventListener("submit", function () { form.setAttribute("data-submitting", ""); });

    document.addEventListener("keydown", function (event) {
      if (event.altKey || event.isComposing) { return; }
      if (typing(event.target)) {
        if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && event.target.form === form) {
          event.preventDefault();
          submit();
        }
        return;
      }
      if (event.ctrlKey || event.metaKey) { return; }
      var match = buttons.filter(function (b) { return b.getAttribute("data-vote-key") === event.key; })[0];
      if (match) {
        event.preventDefault();
        select(match);
      } else if (event.key === "Enter" && selected) {
        event.preventDefault();
        submit();
      }
    });
    var help = document.querySelector("[data-vote-help]");
    if (help) { help.textContent = "Keyboard: 1–4 choose (the choice is highlighted), Enter submits; Ctrl+Enter from the comment box."; }
  }

  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", setup); } else { setup(); }
})();
