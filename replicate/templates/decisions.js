// Marking photos and downloading the decisions, shared by the review, audit and label pages.
// Each .card has data-path and buttons with data-action (keep, remove, move, relabel; label, skip)
// and, for relabel and label, data-label; data-suggested (and data-suggested-label) preselects a
// decision. The download is path,action,new_label for `replicate clean` (or `replicate label --apply`).
// Expects CLASSES (the class names, for the number keys), KEY_ACTIONS ({key: action}),
// LABEL_ACTION (what the number keys do: relabel or label) and DOWNLOAD (the file's name).
const cards = [...document.querySelectorAll('.card')];
const decisions = {};
let current = 0;
function select(i) {
  current = Math.max(0, Math.min(cards.length - 1, i));
  cards.forEach((c, j) => c.classList.toggle('selected', j === current));
  cards[current].scrollIntoView({block: 'nearest'});
}
function decide(i, action, label) {
  const card = cards[i];
  decisions[card.dataset.path] = {action: action, new_label: label || ''};
  card.dataset.decision = action;
  card.querySelector('.decision').textContent = label ? action + ' as ' + label : action;
  document.getElementById('count').textContent = Object.keys(decisions).length;
}
function csvField(s) { return /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; }
function download() {
  const rows = ['path,action,new_label'];
  for (const [path, d] of Object.entries(decisions)) rows.push([path, d.action, d.new_label].map(csvField).join(','));
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([rows.join('\n') + '\n'], {type: 'text/csv'}));
  a.download = DOWNLOAD;
  document.body.appendChild(a); a.click(); a.remove();
}
function offers(card, action, label) {  // a key only does what the card's buttons offer
  return card.querySelector(`button[data-action="${action}"]` + (label ? `[data-label="${label}"]` : ''));
}
cards.forEach((card, i) => {
  if (card.dataset.suggested) decide(i, card.dataset.suggested, card.dataset.suggestedLabel);
  card.addEventListener('click', () => select(i));
  card.querySelectorAll('button').forEach(b => b.addEventListener('click', e => {
    e.stopPropagation(); select(i); decide(i, b.dataset.action, b.dataset.label);
  }));
});
document.addEventListener('keydown', e => {
  if (!cards.length) return;
  const card = cards[current];
  const action = KEY_ACTIONS[e.key];
  const label = /^[1-9]$/.test(e.key) ? CLASSES[+e.key - 1] : undefined;
  if (e.key === 'ArrowRight' || e.key === 'j') select(current + 1);
  else if (e.key === 'ArrowLeft' || e.key === 'k') select(current - 1);
  else if (action && offers(card, action)) { decide(current, action); select(current + 1); }
  else if (label && offers(card, LABEL_ACTION, label)) { decide(current, LABEL_ACTION, label); select(current + 1); }
});
document.getElementById('download').addEventListener('click', download);
if (cards.length) select(0);
