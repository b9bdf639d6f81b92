// The upload form: files by drag and drop or picker, the task type and its
// parameters from api/task-types, the cost rule, and one task per file.
// Files are checked here first (type, size), then quoted by the server before
// Start; the form remembers its choices in localStorage.

import * as api from './api.js';
import { apiErrorText, has, sayServer, t } from './i18n.js';
import { langName } from './tasks.js';

// Offered when the engine does not say which languages it has (pseudo: any).
const COMMON_LANGS = ['ar', 'bg', 'cs', 'da', 'de', 'el', 'en', 'es', 'et', 'fa', 'fi', 'fr', 'he',
  'hi', 'hu', 'id', 'it', 'ja', 'ko', 'lt', 'lv', 'ms', 'nb', 'nl', 'pl', 'pt', 'ro', 'ru', 'sk',
  'sl', 'sv', 'th', 'tr', 'uk', 'vi', 'zh'];
const FORM_KEY = 'zhiyi-form';
const QUOTE_DELAY_MS = 300;

function loadChoices() {
  try {
    return JSON.parse(localStorage.getItem(FORM_KEY) ?? '{}') ?? {};
  } catch {
    return {}; // storage disabled or unreadable: start afresh
  }
}

function saveChoices(choices) {
  try {
    localStorage.setItem(FORM_KEY, JSON.stringify(choices));
  } catch {
    // Not remembered; the form still works.
  }
}

const errorText = apiErrorText;

function newKey() {
  // randomUUID needs a secure context; plain http on a LAN address is not one.
  return crypto.randomUUID?.() ?? `${Date.now()}-${Math.random().toString(36).slice(2)}`;
}

/** Label text of a parameter: the dictionary's, or its name. */
const paramLabel = (name) => (has(`param.${name}`) ? t(`param.${name}`) : name);

export class UploadForm {
  /** `onCreated(task)` after each task made; `onFirstSubmit()` once, on the first upload. */
  constructor(form, { onCreated, onFirstSubmit, balance = () => null }) {
    this.form = form;
    this.onCreated = onCreated;
    this.onFirstSubmit = onFirstSubmit;
    this.balance = balance; // the user's credits now, for "balance after"
    this.types = [];
    this.maxUploadMb = null;
    this.files = []; // {file, key, quote}: the key makes a repeated submit of one file idempotent
    const saved = loadChoices();
    this.savedType = saved.taskType ?? null;
    this.values = saved.values ?? {}; // parameter values chosen so far, kept across re-renders and reloads
    this.quoteTimer = null;
    this.quoteRound = 0;
    this.glossaries = []; // the user's glossaries, for the glossary picker
    this.busy = false;
    this.submitted = false;
    this.q = (selector) => form.querySelector(selector);
    this.wire();
  }

  wire() {
    const zone = this.q('#drop-zone');
    const input = this.q('#file-input');
    input.addEventListener('change', () => {
      this.addFiles(input.files);
      input.value = '';
    });
    for (const name of ['dragenter', 'dragover']) {
      zone.addEventListener(name, (event) => {
        event.preventDefault();
        zone.classList.add('dragging');
      });
    }
    for (const name of ['dragleave', 'drop']) {
      zone.addEventListener(name, () => zone.classList.remove('dragging'));
    }
    zone.addEventListener('drop', (event) => {
      event.preventDefault();
      this.addFiles(event.dataTransfer.files);
    });
    // A file dropped beside the zone must not make the browser leave the page.
    window.addEventListener('dragover', (event) => event.preventDefault());
    window.addEventListener('drop', (event) => event.preventDefault());
    this.q('#task-type').addEventListener('change', () => {
      this.remember();
      this.renderParams();
      this.quoteSoon();
    });
    this.q('#upload-quote').addEventListener('click', () => this.quote());
    this.form.addEventListener('submit', (event) => {
      event.preventDefault();
      this.submit();
    });
  }

  /** Show the task types of `api/task-types` (and fetch the user's glossaries). */
  load(types) {
    this.types = types;
    api.glossaries().then(({ glossaries }) => {
      this.glossaries = glossaries;
      // Only the picker's options change: the rest of the form may be in use.
      const picker = this.q('#param-glossary');
      if (picker) this.fillGlossaries(picker);
    }, () => {}); // without the list the picker offers none; the form still works
    const select = this.q('#task-type');
    // Translation is what most people come for; keep any earlier choice (this page's or the last visit's).
    const known = (name) => types.some((type) => type.taskType === name);
    const chosen = select.value || (known(this.savedType) ? this.savedType : known('translate') ? 'translate' : '');
    select.replaceChildren(
      ...types.map((type) => {
        const label = has(`type.${type.taskType}`) ? t(`type.${type.taskType}`) : type.taskType;
        return new Option(label, type.taskType, false, type.taskType === chosen);
      }),
    );
    this.renderParams();
    this.renderFiles();
  }

  get selectedType() {
    return this.types.find((type) => type.taskType === this.q('#task-type').value) ?? this.types[0];
  }

  renderParams() {
    const type = this.selectedType;
    const box = this.q('#params');
    box.replaceChildren();
    this.q('#quote-list').replaceChildren();
    if (!type) return;
    this.q('#type-description').textContent = sayServer(`desc.${type.taskType}`, type.description);
    for (const [name, spec] of Object.entries(type.params ?? {})) {
      box.append(this.paramField(type, name, spec));
    }
    this.q('#cost-rule').textContent = t('upload.cost', { rule: sayServer(`costRule.${type.taskType}`, type.cost) });
    // Say what each file becomes where it changes kind (".pdf → .docx").
    const results = type.results ?? {};
    const accepted = type.extensions.map((ext) =>
      results[ext] && results[ext] !== ext ? `${ext} → ${results[ext]}` : ext);
    this.q('#accepts').textContent = t('upload.accepts', { list: accepted.join(' ') });
    this.q('#file-input').accept = type.extensions.join(',');
  }

  paramField(type, name, spec) {
    const id = `param-${name}`;
    const field = document.createElement('div');
    field.className = 'field';
    const label = document.createElement('label');
    label.htmlFor = id;
    label.textContent = paramLabel(name) + (spec.required ? ' *' : '');
    let control;
    if (name === 'glossary') {
      control = document.createElement('select');
      this.fillGlossaries(control);
    } else if (name === 'engine' && type.engines) {
      control = document.createElement('select');
      for (const engine of type.engines) {
        // An offline engine says which language pairs it has installed.
        const pairs = (engine.pairs ?? []).map(([from, to]) => `${from} → ${to}`).join(', ');
        const label = engine.test ? t('engine.test', { name: engine.name })
          : pairs ? t('engine.pairs', { name: engine.name, pairs }) : engine.name;
        // How to enable an engine is for administrators (the README, or the API from the server's machine).
        const text = engine.available ? label : t('engine.notSetUp', { name: engine.name });
        const option = new Option(text, engine.name);
        option.disabled = !engine.available;
        control.append(option);
      }
      // The best configured engine, unless this user chose another before.
      const wanted = this.values[name] ?? type.defaultEngine ?? spec.default;
      const usable = type.engines.find((e) => e.name === wanted && e.available)
        ?? type.engines.find((e) => e.name === type.defaultEngine && e.available)
        ?? type.engines.find((e) => e.available);
      if (usable) control.value = usable.name;
    } else if (name === 'targetLang' || name === 'sourceLang') {
      control = document.createElement('select');
      this.fillLanguages(control, type, name, spec);
    } else if (spec.choices) {
      control = document.createElement('select');
      for (const choice of spec.choices) control.append(new Option(sayServer(`choice.${name}.${choice}`, choice), choice));
      control.value = this.values[name] ?? spec.default ?? spec.choices[0];
    } else {
      control = document.createElement('input');
      control.type = 'text';
      control.autocomplete = 'off';
      control.value = this.values[name] ?? spec.default ?? '';
      if (name.endsWith('Lang')) {
        control.setAttribute('list', 'lang-list');
        control.placeholder = name === 'targetLang' ? 'zh, en, ja…' : 'auto';
      }
    }
    control.id = id;
    control.name = name;
    control.required = Boolean(spec.required);
    control.addEventListener(control.tagName === 'SELECT' ? 'change' : 'input', () => {
      this.values[name] = control.value;
      this.remember();
      if (name === 'engine') this.refillLanguages(type);
      this.quoteSoon(); // a quote is for the params it was made with
    });
    field.append(label, control);
    if (spec.description) {
      const hint = document.createElement('small');
      hint.id = `${id}-hint`;
      hint.className = 'hint';
      hint.textContent = sayServer(`hint.${type.taskType}.${name}`, spec.description);
      control.setAttribute('aria-describedby', hint.id);
      field.append(hint);
    }
    return field;
  }

  /** The language picker: names in the page's language, only what the engine translates into. */
  fillLanguages(select, type, name, spec = type.params[name]) {
    const engineName = this.q('#param-engine')?.value ?? this.values.engine ?? type.defaultEngine;
    const engine = type.engines?.find((e) => e.name === engineName);
    const codes = engine?.languages ?? COMMON_LANGS;
    const current = select.value || this.values[name] || spec.default || '';
    const options = codes.map((code) => ({ code, label: langName(code) }))
      .sort((a, b) => a.label.localeCompare(b.label));
    const choices = options.map(({ code, label }) => new Option(`${label} (${code})`, code));
    if (name === 'sourceLang') choices.unshift(new Option(t('lang.auto'), 'auto'));
    else choices.unshift(new Option(t('lang.choose'), ''));
    select.replaceChildren(...choices);
    select.value = [...select.options].some((o) => o.value === current) ? current : (name === 'sourceLang' ? 'auto' : '');
  }

  refillLanguages(type) {
    for (const name of ['targetLang', 'sourceLang']) {
      const select = this.q(`#param-${name}`);
      if (select?.tagName === 'SELECT') this.fillLanguages(select, type, name);
    }
  }

  remember() {
    saveChoices({ taskType: this.q('#task-type').value, values: this.values });
  }

  /** Why a file cannot be a task of the chosen type, found here before any upload; or null. */
  localProblem(file) {
    const type = this.selectedType;
    const dot = file.name.lastIndexOf('.');
    const ext = dot > 0 ? file.name.slice(dot).toLowerCase() : '';
    if (type && !type.extensions.includes(ext)) {
      return t('upload.badType', { ext: ext || file.name, type: this.typeLabel(type), list: type.extensions.join(' ') });
    }
    if (this.maxUploadMb && file.size > this.maxUploadMb * 1024 * 1024) {
      return t('upload.tooLarge', { size: formatSize(file.size), max: this.maxUploadMb });
    }
    return null;
  }

  typeLabel(type) {
    return has(`type.${type.taskType}`) ? t(`type.${type.taskType}`) : type.taskType;
  }

  /** Quote again a moment after the last change (files, type, parameters). */
  quoteSoon() {
    clearTimeout(this.quoteTimer);
    for (const entry of this.files) entry.quote = null;
    this.renderQuotes();
    if (!this.files.length) return;
    this.quoteTimer = setTimeout(() => this.quote({ quiet: true }), QUOTE_DELAY_MS);
  }

  /**
   * Price each chosen file as it would be created now (memory hits included).
   * `quiet`: an automatic quote, which says nothing about a form still being filled in.
   */
  async quote({ quiet = false } = {}) {
    if (!quiet) this.clearMessages();
    if (!this.files.length) {
      if (!quiet) this.showError(t('upload.chooseFile'));
      return;
    }
    if (!this.form.checkValidity()) {
      if (!quiet) this.form.reportValidity();
      return;
    }
    const round = ++this.quoteRound; // a newer quote makes this one's answers stale
    const type = this.selectedType.taskType;
    const params = this.params();
    for (const entry of this.files) {
      entry.quote = null;
      const problem = this.localProblem(entry.file);
      if (problem) {
        entry.quote = { error: problem };
        continue;
      }
      this.q('#upload-status').textContent = t('upload.quoting', { name: entry.file.name });
      try {
        const { quote } = await api.quoteTask(entry.file, type, params);
        if (round !== this.quoteRound) return;
        entry.quote = quote;
      } catch (error) {
        if (round !== this.quoteRound) return;
        entry.quote = { error: errorText(error) };
      }
      this.renderQuotes();
    }
    this.q('#upload-status').textContent = '';
    this.renderQuotes();
  }

  /** The quotes so far, the balance after them, and Start disabled past the balance. */
  renderQuotes() {
    const list = this.q('#quote-list');
    const balance = this.balance();
    let total = 0;
    list.replaceChildren();
    for (const entry of this.files) {
      const quote = entry.quote;
      if (!quote) continue;
      const item = document.createElement('li');
      if (quote.error) {
        item.textContent = t('upload.fileError', { name: entry.file.name, message: quote.error });
        item.className = 'form-error';
      } else {
        total += quote.credits;
        item.textContent = quoteText(entry.file.name, quote, balance === null ? null : balance - total);
        item.dataset.credits = String(quote.credits);
        item.dataset.fromMemory = String(quote.fromMemory);
      }
      list.append(item);
    }
    const short = balance !== null && total > balance;
    this.q('#upload-submit').disabled = this.busy || short;
    if (short) {
      const item = document.createElement('li');
      item.className = 'form-error';
      item.dataset.role = 'short';
      item.textContent = t('upload.short', { n: total, balance });
      list.append(item);
    }
  }

  /** The glossary picker's options: none, then the user's glossaries by name. */
  fillGlossaries(select) {
    const chosen = this.values.glossary ?? select.value ?? '';
    select.replaceChildren(new Option(t('glossary.none'), ''));
    for (const g of this.glossaries) {
      select.append(new Option(t('glossary.option', {
        name: g.name, source: g.sourceLang, target: g.targetLang, terms: g.terms }), g.name));
    }
    select.value = this.glossaries.some((g) => g.name === chosen) ? chosen : '';
  }

  addFiles(fileList) {
    this.clearMessages();
    // A file this type cannot take, or too large, is refused here: nothing is uploaded.
    for (const file of fileList) {
      const problem = this.localProblem(file);
      if (problem) this.showError(t('upload.fileError', { name: file.name, message: problem }));
      else this.files.push({ file, key: newKey(), quote: null });
    }
    this.renderFiles();
    this.quoteSoon();
  }

  renderFiles() {
    const list = this.q('#file-list');
    list.replaceChildren();
    this.q('#no-files').hidden = this.files.length > 0;
    for (const entry of this.files) {
      const item = document.createElement('li');
      const name = document.createElement('span');
      name.textContent = `${entry.file.name} (${formatSize(entry.file.size)})`;
      const remove = document.createElement('button');
      remove.type = 'button';
      remove.className = 'icon-button';
      remove.setAttribute('aria-label', t('upload.remove', { name: entry.file.name }));
      remove.textContent = '×';
      remove.addEventListener('click', () => {
        this.files = this.files.filter((other) => other !== entry);
        this.renderFiles();
        this.renderQuotes();
        this.q('#file-input').focus();
      });
      item.append(name, remove);
      list.append(item);
    }
  }

  params() {
    const params = {};
    for (const control of this.q('#params').querySelectorAll('input, select')) {
      if (control.value.trim() !== '') params[control.name] = control.value.trim();
    }
    return params;
  }

  clearMessages() {
    this.q('#upload-errors').replaceChildren();
    this.q('#upload-status').textContent = '';
  }

  showError(text) {
    const item = document.createElement('li');
    item.textContent = text;
    this.q('#upload-errors').append(item);
  }

  async submit() {
    if (this.busy) return;
    this.clearMessages();
    if (!this.files.length) {
      this.showError(t('upload.chooseFile'));
      this.q('#file-input').focus();
      return;
    }
    if (!this.form.reportValidity()) return;
    const refused = this.files.map((entry) => [entry, this.localProblem(entry.file)]).filter(([, problem]) => problem);
    for (const [entry, problem] of refused) this.showError(t('upload.fileError', { name: entry.file.name, message: problem }));
    if (refused.length) return;
    clearTimeout(this.quoteTimer);
    this.quoteRound += 1; // answers of a quote still under way no longer matter
    if (!this.submitted) this.onFirstSubmit();
    this.submitted = true;
    this.busy = true;
    const button = this.q('#upload-submit');
    button.disabled = true;
    const type = this.selectedType.taskType;
    const params = this.params();
    const kept = [];
    const done = [];
    try {
      for (const entry of this.files) {
        this.q('#upload-status').textContent = t('upload.submitting', { name: entry.file.name });
        try {
          const { task, quote } = await api.createTask(entry.file, type, params, entry.key);
          const fromMemory = quote?.fromMemory ?? 0;
          const no = task.userTaskNo ?? task.taskId;
          done.push(fromMemory
            ? t('upload.createdMemory', { id: no, name: task.fileName, cost: task.creditsCost,
              n: fromMemory, total: quote.segments, count: task.creditsCost })
            : t('upload.created', { id: no, name: task.fileName, cost: task.creditsCost, count: task.creditsCost }));
          this.onCreated(task);
        } catch (error) {
          // The same key again: if the answer was lost after the server made the
          // task, a second try must not make (and charge) another one.
          kept.push(entry);
          this.showError(t('upload.fileError', { name: entry.file.name, message: errorText(error) }));
        }
      }
    } finally {
      this.busy = false;
      button.disabled = false;
    }
    this.files = kept;
    for (const entry of kept) entry.quote = null;
    this.renderFiles();
    this.renderQuotes();
    this.q('#upload-status').textContent = done.join(' ');
  }
}

// "report.docx: 1,234 characters, 2 credits (3 segments from memory), balance after: 998"
function quoteText(name, quote, after) {
  const number = (n) => (typeof n === 'number' ? n.toLocaleString() : '?');
  const vars = { name, chars: number(quote.characters), cost: quote.credits, count: quote.credits,
    n: quote.fromMemory, total: quote.segments, after };
  let text = t('upload.quoted', vars);
  if (quote.fromMemory) text += t('upload.quotedMemory', { ...vars, count: quote.fromMemory });
  if (quote.language && quote.language !== 'unknown') text += t('upload.detected', { lang: langName(quote.language) });
  if (after !== null) text += t('upload.balanceAfter', { after });
  return text;
}

function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}
