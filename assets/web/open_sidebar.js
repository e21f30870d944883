// The "settings" button on a phone: opens the sidebar (its own toggle is a small arrow there).
() => {
  const sidebar = document.querySelector("#settings");
  if (sidebar && !sidebar.classList.contains("open")) sidebar.querySelector(".toggle-button").click();
}
