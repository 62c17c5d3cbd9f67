/* Fine-Tuning Studio: small progressive enhancements. Every page works without this file. */
(function () {
  "use strict";

  // Dangerous actions: <form data-confirm="Deactivate alice?"> or <button data-confirm="…">.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var submitter = event.submitter;
    var message = (submitter && submitter.getAttribute("data-confirm")) || form.getAttribute("data-confirm");
    if (message && !window.confirm(message)) {
      event.preventDefault();
      event.stopImmediatePropagation();
    }
  }, true);
  document.addEventListener("click", function (event) {
    var link = event.target.closest("a[data-confirm]");
    if (link && !window.confirm(link.getAttribute("data-confirm"))) {
      event.preventDefault();
    }
  });
  // HTMX-driven elements (hx-post on a button) ask too.
  document.addEventListener("htmx:confirm", function (event) {
    var message = event.detail.elt.getAttribute("data-confirm");
    if (message && !event.detail.elt.matches("form")) {
      event.preventDefault();
      if (window.confirm(message)) { event.detail.issueRequest(true); }
    }
  });

  // Toasts: dismiss on click, fade out after a while (errors stay until dismissed).
  function dismiss(toast) {
    toast.classList.add("is-leaving");
    window.setTimeout(function () { toast.remove(); }, 220);
  }
  function scheduleToasts(root) {
    root.querySelectorAll(".toast:not([data-scheduled])").forEach(function (toast) {
      toast.setAttribute("data-scheduled", "");
      if (!toast.classList.contains("toast-error")) {
        window.setTimeout(function () { dismiss(toast); }, 6000);
      }
    });
  }
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-dismiss]");
    if (button) { dismiss(button.closest(".toast")); }
  });
  function toast(level, text) {
    var box = document.getElementById("toasts");
    if (!box) { return; }
    var item = document.createElement("div");
    item.className = "toast toast-" + level;
    item.setAttribute("role", level === "error" ? "alert" : "status");
    var span = document.createElement("span");
    span.className = "toast-text";
    span.textContent = text;  // text, never HTML
    var close = document.createElement("button");
    close.type = "button";
    close.className = "toast-close";
    close.setAttribute("data-dismiss", "");
    close.setAttribute("aria-label", "Dismiss");
    close.textContent = "×";
    item.appendChild(span);
    item.appendChild(close);
    box.appendChild(item);
    scheduleToasts(box);
  }
  window.studioToast = toast;

  // HTMX answers that are not swapped (4xx/5xx) still tell the person what happened.
  document.addEventListener("htmx:responseError", function (event) {
    var status = event.detail.xhr.status;
    var text = {
      403: "You don't have the role needed for that.",
      404: "That item no longer exists. Reload the page.",
      429: "Too many requests. Wait a moment and try again.",
      503: "The studio can't reach its database/queue right now. Your data is safe; try again in a minute."
    }[status] || "Something went wrong (" + status + "). Try again; if it keeps happening, tell an engineer.";
    toast("error", text);
  });
  document.addEventListener("htmx:sendError", function () {
    toast("error", "The studio can't be reached. Check your connection and try again.");
  });
  // A fragment request whose session expired lands on the sign-in page: load it as a whole page.
  document.addEventListener("htmx:beforeSwap", function (event) {
    var url = event.detail.xhr.responseURL || "";
    if (url.indexOf("/login/") !== -1 && window.location.pathname.indexOf("/login/") === -1) {
      event.detail.shouldSwap = false;
      window.location.href = url;
    }
  });

  // Sidebar on narrow screens.
  function setSidebar(open) {
    document.body.classList.toggle("sidebar-open", open);
    var toggle = document.querySelector("[data-sidebar-toggle]");
    var backdrop = document.querySelector("[data-sidebar-close]");
    if (toggle) { toggle.setAttribute("aria-expanded", open ? "true" : "false"); }
    if (backdrop) { backdrop.hidden = !open; }
  }
  document.addEventListener("click", function (event) {
    if (event.target.closest("[data-sidebar-toggle]")) {
      setSidebar(!document.body.classList.contains("sidebar-open"));
    } else if (event.target.closest("[data-sidebar-close]")) {
      setSidebar(false);
    }
  });
  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && document.body.classList.contains("sidebar-open")) { setSidebar(false); }
  });

  // Copy buttons: <button data-copy="text to copy">.
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button || !navigator.clipboard) { return; }
    navigator.clipboard.writeText(button.getAttribute("data-copy")).then(function () {
      toast("success", "Copied to the clipboard.");
    });
  });

  // Focus rings only for keyboard users (complements :focus-visible in older browsers).
  document.addEventListener("keydown", function (event) {
    if (event.key === "Tab") { document.documentElement.classList.add("using-keyboard"); }
  });
  document.addEventListener("mousedown", function () {
    document.documentElement.classList.remove("using-keyboard");
  });

  document.addEventListener("DOMContentLoaded", function () { scheduleToasts(document); });
  document.addEventListener("htmx:afterSettle", function () { scheduleToasts(document); });
})();
