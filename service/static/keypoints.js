// How the page draws keypoints, wherever it draws them: the new-job form's preview of an instance, and Try it's
// support and prediction. One colour rule: keypoint n (the number it is shown with, the dataset's own where the
// keypoints come from the dataset) has the same colour everywhere.

/** Keypoint n's colour: hues a golden angle apart, so neighbours differ and a colour stays put as keypoints are added. */
export const colour = (n) => `hsl(${Math.round(n * 137.508) % 360}, 85%, 52%)`;

/**
 * Draws keypoints, and the edges between them, on a canvas's 2D context.
 *
 * points: [x, y] per keypoint, or null for one that is not there (not labelled); at([x, y]): where a point goes in the
 * context's units (default: where it is); labels: the number each point is shown, and coloured, with (default: its
 * index); edges: [a, b] indices into points; selected: the index of a point to ring; confidence: 0..1 per point (an
 * unsure one is faint); radius: the dots' size. Records what it drew, in the canvas's own pixels, as
 * canvas.dataset.painted: [[label, x, y], ...].
 */
export function drawKeypoints(ctx, points, {at = (p) => p, labels = null, edges = [], selected = null, confidence = null,
                                           radius = 6} = {}) {
  const label = (i) => labels?.[i] ?? i;
  for (const [a, b] of edges) {
    if (!points[a] || !points[b]) continue;
    for (const [style, width] of [["rgba(0, 0, 0, 0.7)", 0.75 * radius], ["rgba(255, 255, 255, 0.95)", radius / 3]]) {
      ctx.beginPath();
      ctx.moveTo(...at(points[a]));
      ctx.lineTo(...at(points[b]));
      ctx.strokeStyle = style;
      ctx.lineWidth = width;
      ctx.stroke();
    }
  }
  ctx.font = `bold ${Math.round(2 * radius)}px system-ui, sans-serif`;
  ctx.lineJoin = "round";
  const painted = [];
  const device = ctx.getTransform();
  points.forEach((point, i) => {
    if (!point) return;
    const [x, y] = at(point);
    if (i === selected) {
      ctx.beginPath();
      ctx.arc(x, y, radius + 5, 0, 2 * Math.PI);
      ctx.strokeStyle = "#ffd700";
      ctx.lineWidth = 3;
      ctx.stroke();
    }
    ctx.beginPath();
    ctx.arc(x, y, radius, 0, 2 * Math.PI);
    ctx.globalAlpha = confidence ? 0.35 + 0.65 * Math.max(0, Math.min(1, confidence[i])) : 1;
    ctx.fillStyle = colour(label(i));
    ctx.fill();
    ctx.globalAlpha = 1;
    ctx.strokeStyle = "#000";
    ctx.lineWidth = radius / 4;
    ctx.stroke();
    const text = String(label(i)), tx = x + radius + 2, ty = y - radius;
    ctx.strokeStyle = "rgba(0, 0, 0, 0.85)";
    ctx.lineWidth = radius / 2;
    ctx.strokeText(text, tx, ty);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, tx, ty);
    const centre = device.transformPoint(new DOMPoint(x, y));
    painted.push([label(i), Math.round(centre.x), Math.round(centre.y)]);
  });
  ctx.canvas.dataset.painted = JSON.stringify(painted);
}
