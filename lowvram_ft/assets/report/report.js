// The drift view's filters: by requested language, by "changed" (base and tuned differ), and by the
// language a sentence was given (legend chips dim every other sentence). Nothing is fetched.
(function () {
  "use strict";
  var lang = document.getElementById("f-lang");
  var changed = document.getElementById("f-changed");
  var count = document.getElementById("f-count");
  var items = Array.prototype.slice.call(document.querySelectorAll(".sample"));
  function apply() {
    var shown = 0;
    items.forEach(function (item) {
      var ok = (!lang || lang.value === "all" || item.getAttribute("data-lang") === lang.value) &&
               (!changed || !changed.checked || item.getAttribute("data-changed") === "true");
      item.hidden = !ok;
      if (ok) { shown += 1; }
    });
    if (count) { count.textContent = shown + " of " + items.length + " samples shown"; }
  }
  if (lang) { lang.addEventListener("change", apply); }
  if (changed) { changed.addEventListener("change", apply); }
  var focused = null;
  Array.prototype.forEach.call(document.querySelectorAll(".legend-chip"), function (chip) {
    chip.addEventListener("click", function () {
      var code = chip.getAttribute("data-language");
      focused = focused === code ? null : code;
      document.body.setAttribute("data-focus", focused || "");
      Array.prototype.forEach.call(document.querySelectorAll(".legend-chip"), function (other) {
        other.setAttribute("aria-pressed", String(other.getAttribute("data-language") === focused));
      });
      Array.prototype.forEach.call(document.querySelectorAll(".seg"), function (seg) {
        seg.classList.toggle("dimmed", focused !== null && seg.getAttribute("data-language") !== focused);
      });
    });
  });
  apply();
})();
