// The page of `python monkeypox.py serve`: a photo goes to POST /api/predict, the answer comes back as one line of
// `predict --json` (with the Grad-CAM map when asked) and is shown with what the model card (GET /api/model) says
// the answer is worth. Plain JavaScript, nothing fetched from elsewhere.
'use strict';

const $ = (id) => document.getElementById(id);
let card = null;   // GET /api/model
let photo = null;  // the File shown, sent again when an option changes
let shownUrl = null;

const percent = (p) => `${(100 * p).toFixed(1)}%`;
const fixed = (x) => (x === null || x === undefined ? 'n/a' : x.toFixed(2));
const interval = (ci) => (ci && ci[0] !== null ? ` (95% CI ${fixed(ci[0])}–${fixed(ci[1])})` : '');

function prevalence() {
  const value = parseFloat($('prevalence').value);
  return value > 0 && value < 100 ? value / 100 : null;
}

async function loadCard() {
  const response = await fetch('api/model');
  card = await response.json();
  $('disclaimer').textContent = card.not_a_diagnosis;
  $('model').textContent = `${card.architecture}, classes ${card.classes.join(', ')}` +
    (card.positive_class ? `; screens for ${card.positive_class} at P ≥ ${card.threshold.toFixed(2)}` : '');
  if (!card.grad_cam) {
    $('show-map').checked = false;
    $('show-map').disabled = true;
    $('map-note').textContent = 'not for an ONNX file: serve the PyTorch checkpoint to see it';
  }
  $('prevalence-field').hidden = !card.positive_class;
  describeModel();
}

// Sensitivity, specificity, PPV and NPV come from the validation photos the checkpoint holds out by patient.
function describeModel() {
  const v = card.validation;
  if (!v || v.sensitivity === null || v.sensitivity === undefined) {
    $('validation').textContent = 'This model records no validation sensitivity and specificity.';
  } else {
    $('validation').textContent = `On ${v.n} validation photos of patients it never saw: sensitivity ` +
      `${fixed(v.sensitivity)}${interval(v.sensitivity_ci)}, specificity ${fixed(v.specificity)}` +
      `${interval(v.specificity_ci)}, ROC AUC ${fixed(v.auc)}.`;
  }
  $('predictive').textContent = predictiveValues(v, prevalence());
  const data = card.training_data;
  $('training').textContent = (data ? `Trained on ${data.photos} photos (${data.folder}); their license: ` +
    `${(data.license || 'not recorded with the model').replace(/\.$/, '')}. ` : '') +
    (card.calibration ? `Probabilities calibrated by temperature ${card.calibration.temperature.toFixed(2)}. ` : '') +
    (card.ood ? '' : 'This model has no check for photos unlike its training photos.');
}

// PPV and NPV by Bayes' rule at the prevalence, as `evaluate --prevalence` computes them (mpox/ood.py).
function predictiveValues(v, p) {
  if (!v || v.sensitivity === null || v.sensitivity === undefined || !card.positive_class) return '';
  if (p === null) return 'Set the prevalence above to see what a positive and a negative answer are worth.';
  const se = v.sensitivity, sp = v.specificity;
  const ppv = (p * se) / (p * se + (1 - p) * (1 - sp)), npv = ((1 - p) * sp) / ((1 - p) * sp + p * (1 - se));
  return `At a prevalence of ${percent(p)}: a photo called ${card.positive_class} is one ${percent(ppv)} of the ` +
    `time (PPV); a photo called otherwise is not ${percent(npv)} of the time (NPV).`;
}

function showPhoto(file) {
  if (shownUrl) URL.revokeObjectURL(shownUrl);
  shownUrl = URL.createObjectURL(file);
  $('photo').src = shownUrl;
  $('map').removeAttribute('src');
  $('map').hidden = true;
}

// The centre crop, as the model cut it: the short side resized to `resize`, then `image_size` square in the middle.
function markCrop() {
  const img = $('photo'), w = img.naturalWidth, h = img.naturalHeight;
  if (!w || !h || !card) return;
  const side = (Math.min(w, h) * card.preprocess.image_size) / card.preprocess.resize;
  Object.assign($('crop').style, {
    left: `${(100 * (w - side)) / 2 / w}%`, top: `${(100 * (h - side)) / 2 / h}%`,
    width: `${(100 * side) / w}%`, height: `${(100 * side) / h}%`,
  });
}

async function send() {
  const query = new URLSearchParams();
  if ($('show-map').checked && card.grad_cam && !$('map').getAttribute('src')) query.set('map', '1');
  if (prevalence() !== null && card.positive_class) query.set('prevalence', prevalence());
  const form = new FormData();
  form.append('file', photo);
  $('status').textContent = 'Scoring…';
  $('error').hidden = true;
  try {
    const response = await fetch(`api/predict?${query}`, { method: 'POST', body: form });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
    showAnswer(body);
  } catch (e) {
    $('result').hidden = true;
    $('error').textContent = e.message;
    $('error').hidden = false;
  } finally {
    $('status').textContent = '';
  }
}

function showAnswer(a) {
  $('result').hidden = false;
  $('label').textContent = a.label;
  $('probability').textContent = percent(a.probability);
  const pc = card.positive_class;
  $('decision').textContent = pc
    ? `P(${pc}) = ${a.probabilities[pc].toFixed(3)}, calibrated; called ${pc} at ${card.threshold.toFixed(2)} or above.`
    : `The most probable of ${card.classes.length} classes.`;
  const score = `out-of-distribution score ${fixed(a.ood_score)}, threshold ${card.ood ? fixed(card.ood.threshold) : ''}`;
  $('ood').hidden = a.ood_score === null;
  $('ood').className = a.unlike_training ? 'warning' : 'quiet';
  $('ood').textContent = a.unlike_training
    ? `Warning: this photo is unlike the training photos (${score}): the answer is a guess about something the ` +
      'model was not trained on.'
    : `Like the training photos (${score}).`;
  $('post-test').textContent = postTest(a);
  if (a.map_png) $('map').src = `data:image/png;base64,${a.map_png}`;
  $('map').hidden = !($('map').getAttribute('src') && $('show-map').checked);
}

function postTest(a) {
  if (!card.positive_class || prevalence() === null) return '';
  if (a.post_test_probability === undefined) {
    return 'This model does not record the prevalence it was trained at, so it gives no post-test probability.';
  }
  return `At a prevalence of ${percent(a.prevalence)}, the probability of ${card.positive_class} is ` +
    `${percent(a.post_test_probability)}.`;
}

function choose(file) {
  if (!file) return;
  photo = file;
  showPhoto(file);
  send();
}

// The map is asked for once per photo; the prevalence asks the server again for the post-test probability.
function mapToggled() {
  const have = $('map').getAttribute('src');
  $('map').hidden = !(have && $('show-map').checked);
  if (photo && $('show-map').checked && !have) send();
}

function prevalenceChanged() {
  describeModel();
  if (photo) send();
}

$('choose').addEventListener('change', (e) => choose(e.target.files[0]));
$('camera').addEventListener('change', (e) => choose(e.target.files[0]));
$('photo').addEventListener('load', markCrop);
$('show-map').addEventListener('change', mapToggled);
$('prevalence').addEventListener('change', prevalenceChanged);
document.addEventListener('dragover', (e) => { e.preventDefault(); $('drop').classList.add('over'); });
document.addEventListener('dragleave', () => $('drop').classList.remove('over'));
document.addEventListener('drop', (e) => {
  e.preventDefault();
  $('drop').classList.remove('over');
  choose(e.dataTransfer.files[0]);
});
loadCard().catch((e) => { $('model').textContent = `The model card did not load: ${e.message}`; });
