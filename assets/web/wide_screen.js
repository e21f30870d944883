// On load: whether the window is wider than a phone (then the sidebar opens beside the call).
// config: {max_width: the widest window, in CSS px, that counts as a phone}
(config) => [!window.matchMedia(`(max-width: ${config.max_width}px)`).matches]
