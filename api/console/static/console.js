// keygate console: copy buttons (the page works without this script; the value can be selected).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.hidden = false;
    button.addEventListener("click", async () => {
      const field = document.getElementById(button.dataset.copy);
      try {
        await navigator.clipboard.writeText(field.value);
        button.textContent = "Copied";
      } catch (e) {
        field.select();
        button.textContent = "Press Ctrl+C to copy";
      }
    });
  }
});
