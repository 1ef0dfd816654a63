// Disable a form's button while its request runs, so a slow search is not sent twice.
document.addEventListener("submit", (event) => {
  const form = event.target;
  for (const button of form.querySelectorAll("button[type=submit]")) {
    button.disabled = true;
    button.dataset.label = button.textContent;
    button.textContent = "Working…";
  }
});
// Coming back with the browser's history shows the page as it was: enable the buttons again.
window.addEventListener("pageshow", () => {
  for (const button of document.querySelectorAll("button[disabled]")) {
    button.disabled = false;
    if (button.dataset.label) button.textContent = button.dataset.label;
  }
});
