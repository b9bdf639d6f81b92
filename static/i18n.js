// The interface strings in Chinese and English, and the helpers that apply them.
// Server messages (stages, status and error messages, notifications) arrive with
// a code and parameters besides their English text (messages.py); `say` renders
// them here, so they follow a language switch. Counts use Intl.PluralRules:
// a string may be `{one, other}`, chosen by the `n` or `count` parameter.

const STRINGS = {
  en: {
    'app.title': 'Zhiyi document translation',
    'skip': 'Skip to the content',
    'lang.switch': '中文',
    'lang.switchLabel': 'Switch the interface to Chinese',
    'conn.connecting': 'Connecting…',
    'conn.live': 'Live',
    'conn.reconnecting': 'Reconnecting…',
    'credits': 'Credits: {n}',
    'user': 'Signed in as {user}',
    'logout': 'Log out',
    'login.title': 'Log in',
    'login.help': 'Paste an API token (from “zhiyi user add” or “zhiyi user token”), or open the link that “zhiyi serve” prints.',
    'login.token': 'API token',
    'login.submit': 'Log in',
    'login.failed': 'The token in that link is not valid. Paste a valid token below.',
    'login.required': 'Enter a token.',
    'upload.title': 'New task',
    'upload.drop': 'Drop documents here, or choose files',
    'upload.dropHint': 'Several files at once; each becomes its own task.',
    'upload.accepts': 'Accepted: {list}',
    'upload.selected': 'Selected files',
    'upload.remove': 'Remove {name}',
    'upload.none': 'No file chosen yet.',
    'upload.type': 'Task type',
    'upload.cost': 'Cost: {rule}',
    'upload.submit': 'Start',
    'upload.submitting': 'Uploading {name}…',
    'upload.created': { one: 'Task #{id} created for {name}: {cost} credit.', other: 'Task #{id} created for {name}: {cost} credits.' },
    'upload.createdMemory': { one: 'Task #{id} created for {name}: {cost} credit ({n} of {total} segments from your translation memory).', other: 'Task #{id} created for {name}: {cost} credits ({n} of {total} segments from your translation memory).' },
    'upload.quote': 'Quote',
    'upload.quoting': 'Pricing {name}…',
    'upload.quoted': { one: '{name}: {chars} characters, {cost} credit', other: '{name}: {chars} characters, {cost} credits' },
    'upload.quotedMemory': { one: ' ({n} segment from memory)', other: ' ({n} segments from memory)' },
    'upload.detected': '; language: {lang}',
    'upload.balanceAfter': ', balance after: {after}',
    'upload.short': 'Not enough credits: {n} needed, your balance is {balance}.',
    'upload.badType': '{type} does not take {ext} files (accepted: {list})',
    'upload.tooLarge': 'the file is {size}, larger than the {max} MB limit',
    'engine.test': '{name} — test engine, produces fake text',
    'engine.notSetUp': '{name} (not set up on this server)',
    'lang.choose': 'Choose a language',
    'glossary.none': '(no glossary)',
    'glossary.option': { one: '{name} ({source} → {target}, {terms} term)', other: '{name} ({source} → {target}, {terms} terms)' },
    'engine.pairs': '{name} ({pairs})',
    'param.glossary': 'Glossary',
    'param.memory': 'Translation memory',
    'param.outputEncoding': 'Encoding of the result',
    // The server's English texts (task types, cost rules, parameter hints), said here in
    // the page's language; used only while the server's text is exactly the English one.
    'desc.translate': 'Translates the document segment by segment, keeping its format',
    'desc.analyze': 'A JSON report: characters, words, segments, language, credit quotes',
    'desc.extract': 'The document’s plain text (UTF-8)',
    'costRule.translate': '1 credit per 1,000 characters, at least 1',
    'costRule.extract': '1 credit per 10,000 characters, at least 1',
    'costRule.analyze': '1 credit',
    'hint.translate.targetLang': 'Language to translate into, e.g. zh',
    'hint.translate.sourceLang': 'Language of the document, or auto',
    'hint.translate.engine': 'Translation engine',
    'hint.translate.glossary': 'Name of one of your glossaries for this language pair: its terms come out as given',
    'hint.translate.memory': 'use (the default): segments in your translation memory are not sent or charged; ignore: translate everything again',
    'hint.translate.outputEncoding': 'source (the default): a text file comes back in its own encoding and byte-order mark; utf-8: as UTF-8',
    'hint.analyze.targetLang': 'Quote a translation into this language (counts segments in your translation memory)',
    'hint.analyze.sourceLang': 'Language of the document, or auto',
    'hint.analyze.engine': 'Engine of the quoted translation',
    'choice.memory.use': 'use',
    'choice.memory.ignore': 'ignore',
    'choice.outputEncoding.source': 'source',
    'choice.outputEncoding.utf-8': 'utf-8',
    'upload.chooseFile': 'Choose at least one file.',
    'upload.fileError': '{name}: {message}',
    'param.targetLang': 'Target language',
    'param.sourceLang': 'Source language',
    'param.engine': 'Engine',
    'tasks.title': 'Tasks',
    'tasks.empty': 'No tasks yet. Upload a document to start one.',
    'tasks.more': 'Load more',
    'tasks.clearFinished': 'Clear finished',
    'tasks.confirmClear': { one: 'Delete {n} finished task?', other: 'Delete {n} finished tasks?' },
    'tasks.clearFailed': { one: '{n} task could not be deleted.', other: '{n} tasks could not be deleted.' },
    'tasks.noneShown': 'No task matches.',
    'filter.label': 'Show',
    'filter.all': 'All',
    'filter.active': 'Active',
    'filter.finished': 'Finished',
    'filter.failed': 'Failed',
    'search.label': 'Search by file name',
    'search.placeholder': 'Search by file name',
    'upload.open': 'New task',
    'upload.close': 'Hide the form',
    'status.retrying': 'Retrying',
    'lang.auto': 'Detect automatically',
    'tasks.loading': 'Loading…',
    'task.cancel': 'Cancel',
    'task.retry': 'Retry',
    'task.delete': 'Delete',
    'task.confirmDelete': 'Really delete?',
    'task.download': 'Download',
    'task.expired': 'The result was deleted after the retention period.',
    'task.cost': { one: '{n} credit', other: '{n} credits' },
    'task.created': 'Created {time}',
    'task.completed': 'Ended {time}',
    'task.eta': 'about {s} s left',
    'task.attempt': 'attempt {n}',
    'task.progressLabel': 'Progress of {name}',
    'task.actions': 'Actions for {name}',
    'status.pending': 'Pending',
    'status.processing': 'Processing',
    'status.completed': 'Completed',
    'status.failed': 'Failed',
    'status.cancelled': 'Cancelled',
    'stage.parsing': 'reading',
    'stage.translating': 'translating',
    'stage.writing': 'writing',
    'stage.extracting': 'extracting',
    'stage.submitting': 'sending',
    'stage.waiting': 'waiting',
    'type.translate': 'Translate',
    'type.analyze': 'Analyze',
    'type.extract': 'Extract text',
    'notify.title.completed': 'Task completed',
    'notify.title.failed': 'Task failed',
    'notify.title.cancelled': 'Task cancelled',
    'error.network_error': 'The server could not be reached. Check that it is running.',
    'error.unauthenticated': 'You are logged out. Log in again.',
    'error.insufficient_credits': 'You do not have enough credits for this task.',
    'error.file_too_large': 'The file is larger than the upload limit.',
    'error.too_large': 'The request is too large.',
    'error.unsupported_file_type': 'This task type does not take files of this kind.',
    'error.unsupported_media_type': 'The request is not in a format the server takes.',
    'error.too_many_active_tasks': 'You have too many tasks running; wait for some to finish.',
    'error.insufficient_storage': 'Your storage is full; delete some old tasks.',
    'error.bad_document': 'The document could not be read.',
    'error.bad_params': 'The task’s settings are not valid.',
    'error.bad_request': 'The request is not valid.',
    'error.missing_file': 'Choose a file.',
    'error.unknown_engine': 'The chosen engine is not available on this server.',
    'error.unknown_glossary': 'That glossary does not exist.',
    'error.glossary_not_found': 'That glossary does not exist.',
    'error.bad_glossary': 'The glossary file could not be read.',
    'error.bad_tmx': 'The TMX file could not be read.',
    'error.unknown_task_type': 'This task type does not exist.',
    'error.task_not_found': 'The task no longer exists (it may have been deleted).',
    'error.invalid_state': 'The task cannot do that in its current state.',
    'error.expired': 'The task’s files were deleted after the retention period.',
    'error.not_completed': 'The task has not finished yet.',
    'error.cross_site': 'The request was refused as coming from another site. Reload the page.',
    'error.request_timeout': 'The upload took too long. Try again.',
    'error.internal_error': 'The server had an internal error.',
    'error.store_unavailable': 'The server’s database is not answering. Try again shortly.',
    'error.unavailable': 'The server is not available right now. Try again shortly.',
    'error.too_many_streams': 'Too many pages are open.',
    'error.http_error': 'The server answered with an error.',
    'error.not_admin': 'Only an administrator can do that.',
    'error.user_exists': 'A user of that name exists already.',
    'error.user_not_found': 'There is no user of that name.',
    'stage.starting': 'starting',
    'stage.done': 'done',
    'msg.queued': 'waiting for a worker',
    'msg.starting': 'starting',
    'msg.reading': 'reading the document',
    'msg.segments': 'segment {done} of {total}',
    'msg.writing': 'writing the translated document',
    'msg.formatting_lost': {
      one: '{count} segment lost inline formatting (the engine broke its tags); the text is complete',
      other: '{count} segments lost inline formatting (the engine broke its tags); the text is complete',
    },
    'msg.analysed': 'analysed',
    'msg.extracting': 'extracting text',
    'msg.extracted': 'extracted',
    'msg.submitting': 'sending to the external service',
    'msg.submitted': 'sent to the external service',
    'msg.external_processing': 'processing externally',
    'msg.resuming': 'interrupted; waiting to resume',
    'msg.restarting': 'the server is restarting; waiting to resume',
    'msg.cancelled': 'cancelled',
    'msg.completed': 'completed',
    'msg.retrying': 'the attempt failed; Zhiyi will try again in {seconds} s',
    'msg.gave_up': { one: 'gave up after {attempts} attempt', other: 'gave up after {attempts} attempts' },
    'msg.interrupted': 'the server stopped too many times while this task ran',
    'msg.timed_out': 'processing took longer than {seconds} s',
    'msg.disk_full': "the server's disk is full; retry the task once space has been freed",
    'msg.processing_failed': 'processing failed',
    'msg.external_unreachable': 'the external service could not be reached',
    'msg.external_late': 'the external service did not report back in time',
    'msg.external_failed': 'the external service reported a failure',
    'msg.no_external': 'no external service is configured on this server',
    'msg.text': '{text}',
    'msg.part.memory': '{fromMemory} of {segments} segments from memory',
    'msg.part.terms': { one: '{terms} glossary term applied', other: '{terms} glossary terms applied' },
    'failure.processor_error': 'Processing failed.',
    'failure.bad_document': 'The document could not be read.',
    'failure.bad_params': 'The task’s settings are not valid.',
    'failure.engine_error': 'The translation engine refused the text.',
    'failure.engine_unavailable': 'The chosen translation engine is not available on this server.',
    'failure.external_error': 'The external service reported a failure.',
    'failure.external_timeout': 'The external service did not report back in time.',
    'failure.timeout': 'Processing took too long.',
    'failure.insufficient_storage': 'The server’s disk was full. Retry once space is freed.',
    'failure.interrupted': 'The server stopped too many times while this task ran.',
    'failure.unknown': 'The task failed.',
    'task.details': 'Details',
    'task.retrying': 'retrying, attempt {n} of {max}',
    'notify.credits_granted': { one: '{amount} credit', other: '{amount} credits' },
    'notify.credits_charged': { one: '{amount} credit charged for task #{taskId}', other: '{amount} credits charged for task #{taskId}' },
    'notify.credits_refunded': { one: '{amount} credit refunded for task #{taskId}', other: '{amount} credits refunded for task #{taskId}' },
  },
  zh: {
    'app.title': '智译 文档翻译',
    'skip': '跳到主要内容',
    'lang.switch': 'English',
    'lang.switchLabel': '把界面切换为英文',
    'conn.connecting': '正在连接…',
    'conn.live': '实时',
    'conn.reconnecting': '正在重新连接…',
    'credits': '积分：{n}',
    'user': '当前用户：{user}',
    'logout': '退出登录',
    'login.title': '登录',
    'login.help': '粘贴 API 令牌（由“zhiyi user add”或“zhiyi user token”生成），或打开“zhiyi serve”打印的链接。',
    'login.token': 'API 令牌',
    'login.submit': '登录',
    'login.failed': '链接中的令牌无效。请在下方粘贴有效的令牌。',
    'login.required': '请输入令牌。',
    'upload.title': '新建任务',
    'upload.drop': '把文档拖到这里，或选择文件',
    'upload.dropHint': '可一次选择多个文件，每个文件一个任务。',
    'upload.accepts': '支持：{list}',
    'upload.selected': '已选文件',
    'upload.remove': '移除 {name}',
    'upload.none': '尚未选择文件。',
    'upload.type': '任务类型',
    'upload.cost': '费用：{rule}',
    'upload.submit': '开始',
    'upload.submitting': '正在上传 {name}…',
    'upload.created': '已为 {name} 创建任务 #{id}：{cost} 积分。',
    'upload.createdMemory': '已为 {name} 创建任务 #{id}：{cost} 积分（{total} 段中 {n} 段来自翻译记忆）。',
    'upload.quote': '报价',
    'upload.quoting': '正在计算 {name} 的费用…',
    'upload.quoted': '{name}：{chars} 个字符，{cost} 积分',
    'upload.quotedMemory': '（{n} 段来自翻译记忆）',
    'upload.detected': '；语言：{lang}',
    'upload.balanceAfter': '，之后余额：{after}',
    'upload.short': '积分不足：需要 {n}，您的余额为 {balance}。',
    'upload.badType': '{type}不接受 {ext} 文件（支持：{list}）',
    'upload.tooLarge': '文件大小为 {size}，超过 {max} MB 的上限',
    'engine.test': '{name} — 测试引擎，生成假文本',
    'engine.notSetUp': '{name}（此服务器未配置）',
    'lang.choose': '选择语言',
    'glossary.none': '（不用术语表）',
    'glossary.option': '{name}（{source} → {target}，{terms} 条）',
    'engine.pairs': '{name}（{pairs}）',
    'param.glossary': '术语表',
    'param.memory': '翻译记忆',
    'param.outputEncoding': '结果的编码',
    'desc.translate': '逐段翻译文档，保留原有格式',
    'desc.analyze': 'JSON 报告：字符数、词数、段数、语言和积分报价',
    'desc.extract': '文档的纯文本（UTF-8 编码）',
    'costRule.translate': '每 1,000 个字符 1 积分，至少 1 积分',
    'costRule.extract': '每 10,000 个字符 1 积分，至少 1 积分',
    'costRule.analyze': '1 积分',
    'hint.translate.targetLang': '译入的语言',
    'hint.translate.sourceLang': '文档的语言，或自动检测',
    'hint.translate.engine': '翻译引擎',
    'hint.translate.glossary': '您在此语言对上的术语表：其中的术语按给定译法输出',
    'hint.translate.memory': '使用（默认）：翻译记忆中已有的段落不发送也不收费；不使用：全部重新翻译',
    'hint.translate.outputEncoding': '与原文相同（默认）：文本文件按其原有编码和字节顺序标记返回；UTF-8：以 UTF-8 返回',
    'hint.analyze.targetLang': '按此目标语言给出翻译报价（计入翻译记忆中的段落）',
    'hint.analyze.sourceLang': '文档的语言，或自动检测',
    'hint.analyze.engine': '报价所用的翻译引擎',
    'choice.memory.use': '使用',
    'choice.memory.ignore': '不使用',
    'choice.outputEncoding.source': '与原文相同',
    'choice.outputEncoding.utf-8': 'UTF-8',
    'upload.chooseFile': '请至少选择一个文件。',
    'upload.fileError': '{name}：{message}',
    'param.targetLang': '目标语言',
    'param.sourceLang': '源语言',
    'param.engine': '翻译引擎',
    'tasks.title': '任务',
    'tasks.empty': '还没有任务。上传文档即可开始。',
    'tasks.more': '加载更多',
    'tasks.clearFinished': '清除已结束',
    'tasks.confirmClear': '删除 {n} 个已结束的任务？',
    'tasks.clearFailed': '{n} 个任务无法删除。',
    'tasks.noneShown': '没有符合条件的任务。',
    'filter.label': '显示',
    'filter.all': '全部',
    'filter.active': '进行中',
    'filter.finished': '已结束',
    'filter.failed': '失败',
    'search.label': '按文件名搜索',
    'search.placeholder': '按文件名搜索',
    'upload.open': '新建任务',
    'upload.close': '收起表单',
    'status.retrying': '重试中',
    'lang.auto': '自动检测',
    'tasks.loading': '加载中…',
    'task.cancel': '取消',
    'task.retry': '重试',
    'task.delete': '删除',
    'task.confirmDelete': '确定删除？',
    'task.download': '下载',
    'task.expired': '结果已超过保留期限并被删除。',
    'task.cost': '{n} 积分',
    'task.created': '创建于 {time}',
    'task.completed': '结束于 {time}',
    'task.eta': '约剩 {s} 秒',
    'task.attempt': '第 {n} 次尝试',
    'task.progressLabel': '{name} 的进度',
    'task.actions': '{name} 的操作',
    'status.pending': '等待中',
    'status.processing': '处理中',
    'status.completed': '已完成',
    'status.failed': '失败',
    'status.cancelled': '已取消',
    'stage.parsing': '解析',
    'stage.translating': '翻译',
    'stage.writing': '写入',
    'stage.extracting': '提取',
    'stage.submitting': '提交',
    'stage.waiting': '等待',
    'type.translate': '翻译',
    'type.analyze': '分析',
    'type.extract': '提取文本',
    'notify.title.completed': '任务已完成',
    'notify.title.failed': '任务失败',
    'notify.title.cancelled': '任务已取消',
    'error.network_error': '无法连接服务器，请确认它正在运行。',
    'error.unauthenticated': '您已退出登录，请重新登录。',
    'error.insufficient_credits': '积分不足，无法创建此任务。',
    'error.file_too_large': '文件超过上传大小上限。',
    'error.too_large': '请求过大。',
    'error.unsupported_file_type': '此任务类型不接受这类文件。',
    'error.unsupported_media_type': '请求格式不受服务器支持。',
    'error.too_many_active_tasks': '进行中的任务过多，请等待部分任务完成。',
    'error.insufficient_storage': '存储空间已满，请删除一些旧任务。',
    'error.bad_document': '无法读取该文档。',
    'error.bad_params': '任务设置无效。',
    'error.bad_request': '请求无效。',
    'error.missing_file': '请选择文件。',
    'error.unknown_engine': '所选引擎在此服务器上不可用。',
    'error.unknown_glossary': '该术语表不存在。',
    'error.glossary_not_found': '该术语表不存在。',
    'error.bad_glossary': '无法读取该术语表文件。',
    'error.bad_tmx': '无法读取该翻译记忆交换文件。',
    'error.unknown_task_type': '该任务类型不存在。',
    'error.task_not_found': '该任务已不存在（可能已被删除）。',
    'error.invalid_state': '任务当前的状态不允许此操作。',
    'error.expired': '任务的文件已超过保留期限并被删除。',
    'error.not_completed': '任务尚未完成。',
    'error.cross_site': '请求被视为来自其他网站而被拒绝。请刷新页面。',
    'error.request_timeout': '上传超时，请重试。',
    'error.internal_error': '服务器发生内部错误。',
    'error.store_unavailable': '服务器数据库暂时无响应，请稍后重试。',
    'error.unavailable': '服务器暂时不可用，请稍后重试。',
    'error.too_many_streams': '打开的页面过多。',
    'error.http_error': '服务器返回了错误。',
    'error.not_admin': '只有管理员可以执行此操作。',
    'error.user_exists': '已有同名用户。',
    'error.user_not_found': '没有这个用户。',
    'stage.starting': '开始',
    'stage.done': '完成',
    'msg.queued': '等待处理',
    'msg.starting': '正在开始',
    'msg.reading': '正在读取文档',
    'msg.segments': '第 {done} 段，共 {total} 段',
    'msg.writing': '正在写入译文',
    'msg.formatting_lost': '{count} 段失去了行内格式（引擎破坏了标记）；文字完整',
    'msg.analysed': '分析完成',
    'msg.extracting': '正在提取文本',
    'msg.extracted': '提取完成',
    'msg.submitting': '正在发送到外部服务',
    'msg.submitted': '已发送到外部服务',
    'msg.external_processing': '外部服务处理中',
    'msg.resuming': '已中断，等待继续',
    'msg.restarting': '服务器正在重启，等待继续',
    'msg.cancelled': '已取消',
    'msg.completed': '已完成',
    'msg.retrying': '本次尝试失败，智译将在 {seconds} 秒后重试',
    'msg.gave_up': '尝试 {attempts} 次后放弃',
    'msg.interrupted': '任务运行期间服务器多次停止',
    'msg.timed_out': '处理时间超过 {seconds} 秒',
    'msg.disk_full': '服务器磁盘已满；腾出空间后请重试任务',
    'msg.processing_failed': '处理失败',
    'msg.external_unreachable': '无法连接外部服务',
    'msg.external_late': '外部服务未按时回报',
    'msg.external_failed': '外部服务报告失败',
    'msg.no_external': '此服务器未配置外部服务',
    'msg.text': '{text}',
    'msg.part.memory': '{segments} 段中 {fromMemory} 段来自翻译记忆',
    'msg.part.terms': '应用了 {terms} 个术语',
    'failure.processor_error': '处理失败。',
    'failure.bad_document': '无法读取该文档。',
    'failure.bad_params': '任务设置无效。',
    'failure.engine_error': '翻译引擎拒绝了该文本。',
    'failure.engine_unavailable': '所选翻译引擎在此服务器上不可用。',
    'failure.external_error': '外部服务报告失败。',
    'failure.external_timeout': '外部服务未按时回报。',
    'failure.timeout': '处理时间过长。',
    'failure.insufficient_storage': '服务器磁盘已满。腾出空间后请重试。',
    'failure.interrupted': '任务运行期间服务器多次停止。',
    'failure.unknown': '任务失败。',
    'task.details': '详细信息',
    'task.retrying': '正在重试，第 {n} 次，共 {max} 次',
    'notify.credits_granted': '积分变动 {amount}',
    'notify.credits_charged': '任务 #{taskId} 扣除 {amount} 积分',
    'notify.credits_refunded': '任务 #{taskId} 退还 {amount} 积分',
  },
};

const STORAGE_KEY = 'zhiyi-lang';
const listeners = new Set();
let lang = initialLang();

function initialLang() {
  let saved = null;
  try {
    saved = localStorage.getItem(STORAGE_KEY);
  } catch {
    // Storage can be disabled; the browser language is then enough.
  }
  if (saved && saved in STRINGS) return saved;
  return (navigator.language || 'en').toLowerCase().startsWith('zh') ? 'zh' : 'en';
}

/** The current language code, `zh` or `en`. */
export function getLang() {
  return lang;
}

/** Whether the dictionary has a string for `key`. */
export function has(key) {
  return key in STRINGS[lang];
}

/**
 * The string for `key` with `{name}` placeholders filled from `vars`. A string
 * with plural forms is chosen by `vars.n` (or `count`, `amount`, `attempts`, `terms`).
 */
export function t(key, vars = {}) {
  let template = STRINGS[lang][key] ?? STRINGS.en[key] ?? key;
  if (typeof template === 'object') {
    const count = ['count', 'n', 'amount', 'attempts', 'terms'].map((name) => vars[name]).find((v) => typeof v === 'number');
    template = template[plurals().select(Math.abs(count ?? 0))] ?? template.other;
  }
  return template.replace(/\{(\w+)\}/g, (whole, name) => (name in vars ? String(vars[name]) : whole));
}

let pluralRules = null;
function plurals() {
  if (!pluralRules || pluralRules.resolvedOptions().locale.slice(0, 2) !== lang) {
    pluralRules = new Intl.PluralRules(lang === 'zh' ? 'zh-CN' : 'en');
  }
  return pluralRules;
}

/**
 * A server message in the page's language, from its code and parameters
 * (messages.py); `fallback` (the server's English text) when the code is unknown.
 */
export function say(code, params = {}, fallback = '') {
  if (!code || !has(`msg.${code}`)) return fallback;
  let text = t(`msg.${code}`, params);
  const parts = [];
  if (typeof params.fromMemory === 'number') parts.push(t('msg.part.memory', params));
  if (typeof params.terms === 'number') parts.push(t('msg.part.terms', params));
  if (parts.length) text += lang === 'zh' ? `（${parts.join('；')}）` : ` (${parts.join('; ')})`;
  return text;
}

/** A notification event's text in the page's language (its `code`), or its message. */
export function sayNotice(data) {
  if (!data.code || !has(`notify.${data.code}`)) return data.message;
  // "task #N" is the user's own number of the task (taskNo), as its row shows.
  const params = { ...data.params, taskId: data.params?.taskNo ?? data.params?.taskId };
  if (data.code === 'credits_granted' && params.amount > 0) params.amount = `+${params.amount}`;
  // `+5` is a string: the plural form is chosen from the number.
  return t(`notify.${data.code}`, { ...params, n: data.params?.amount });
}

/**
 * An API error for a person: in English the server's own sentence (it names the detail
 * and the next step), in another language the code's sentence; the page's own codes
 * (no connection, logged out) always from the dictionary.
 */
export function apiErrorText(error) {
  const key = `error.${error.code}`;
  const own = error.code === 'network_error' || error.code === 'unauthenticated';
  if ((own || lang !== 'en' || !error.message) && has(key)) return t(key);
  return error.message;
}

/**
 * A text the server wrote in English (a task type's description, a cost rule, a
 * parameter's hint) in the page's language: the dictionary's, when its English
 * matches the server's text (a server with other texts keeps its own), else as sent.
 */
export function sayServer(key, english) {
  const known = STRINGS.en[key];
  if (typeof known !== 'string' || known.replace(/’/g, "'") !== (english ?? '').replace(/’/g, "'")) return english ?? '';
  return t(key);
}

/** Every key of the Chinese and English dictionaries (the tests check both are complete). */
export const KEYS = { en: Object.keys(STRINGS.en), zh: Object.keys(STRINGS.zh) };

/** Switch language, remember it, re-label the static page and tell the listeners. */
export function setLang(next) {
  if (!(next in STRINGS) || next === lang) return;
  lang = next;
  try {
    localStorage.setItem(STORAGE_KEY, next);
  } catch {
    // Not remembered; still switched for this page.
  }
  applyStatic(document);
  for (const fn of listeners) fn(lang);
}

/** Call `fn(lang)` after every language switch. */
export function onLangChange(fn) {
  listeners.add(fn);
}

/** Fill elements marked `data-i18n` (text) and `data-i18n-<attr>` (attributes). */
export function applyStatic(root) {
  document.documentElement.lang = lang === 'zh' ? 'zh-CN' : 'en';
  document.title = t('app.title');
  for (const el of root.querySelectorAll('[data-i18n]')) el.textContent = t(el.dataset.i18n);
  for (const attr of ['aria-label', 'placeholder', 'title']) {
    const data = `i18n${attr.replace(/(^|-)(\w)/g, (_, __, c) => c.toUpperCase())}`;
    for (const el of root.querySelectorAll(`[data-i18n-${attr}]`)) {
      el.setAttribute(attr, t(el.dataset[data]));
    }
  }
}

/**
 * The locale for dates: the browser's own for the page's language (en-GB, zh-TW...),
 * else the language itself; so an English page in Britain shows British dates.
 */
export function locale() {
  const own = (navigator.languages ?? [navigator.language]).find((tag) => tag?.toLowerCase().startsWith(lang));
  return own ?? (lang === 'zh' ? 'zh-CN' : 'en');
}

/** A date in the browser's format for the page's language. */
export function formatTime(iso) {
  if (!iso) return '';
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  return new Intl.DateTimeFormat(locale(), { dateStyle: 'short', timeStyle: 'medium' }).format(date);
}
