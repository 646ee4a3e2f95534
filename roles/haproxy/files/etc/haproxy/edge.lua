-- The edge's Lua: edge_model (a converter) and edge_month_left (a fetch, below).
--
-- edge_model reads the "model" field of a JSON request body the way the engine will: the engine's
-- parser (Python's json) takes the LAST of duplicate keys and decodes escapes in keys
-- and strings, so a first-match search could route on one model while the engine
-- serves another.  The converter scans the object's top level and answers:
--   "m<model>"  exactly one "model" key, a string (decoded)
--   "n"         a complete JSON object without "model"
--   "d"         more than one "model" key
--   "t"         a "model" that is not a string
--   "j"         not one complete JSON object (also: cut off by the buffer)
-- Only the structure is scanned (strings, nesting); numbers and literals are the
-- engine's to refuse.

-- lua-load's arguments: the route map and the key map (seed_usage, below).
local script_args = table.pack(...)

local function utf8_char(code)
  if code < 0x80 then
    return string.char(code)
  elseif code < 0x800 then
    return string.char(0xC0 | (code >> 6), 0x80 | (code & 0x3F))
  elseif code < 0x10000 then
    return string.char(0xE0 | (code >> 12), 0x80 | ((code >> 6) & 0x3F), 0x80 | (code & 0x3F))
  end
  return string.char(0xF0 | (code >> 18), 0x80 | ((code >> 12) & 0x3F),
                     0x80 | ((code >> 6) & 0x3F), 0x80 | (code & 0x3F))
end

local simple_escapes = { ['"'] = '"', ['\\'] = '\\', ['/'] = '/', b = '\b', f = '\f',
                         n = '\n', r = '\r', t = '\t' }

-- The string whose opening quote is at "start": its decoded value and the position
-- after its closing quote, or nil when it is cut off or malformed.
local function read_string(body, start)
  local parts = {}
  local pos = start + 1
  while true do
    local stop = string.find(body, '["\\]', pos)
    if not stop then
      return nil
    end
    parts[#parts + 1] = string.sub(body, pos, stop - 1)
    if string.sub(body, stop, stop) == '"' then
      return table.concat(parts), stop + 1
    end
    local escape = string.sub(body, stop + 1, stop + 1)
    if simple_escapes[escape] then
      parts[#parts + 1] = simple_escapes[escape]
      pos = stop + 2
    elseif escape == 'u' then
      local code = tonumber(string.sub(body, stop + 2, stop + 5), 16)
      if not code or #string.sub(body, stop + 2, stop + 5) ~= 4 then
        return nil
      end
      pos = stop + 6
      if code >= 0xD800 and code < 0xDC00 and string.sub(body, pos, pos + 1) == '\\u' then
        local low = tonumber(string.sub(body, pos + 2, pos + 5), 16)
        if low and low >= 0xDC00 and low < 0xE000 then
          code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
          pos = pos + 6
        end
      end
      parts[#parts + 1] = utf8_char(code)
    else
      return nil
    end
  end
end

local function edge_model(body)
  local pos = string.find(body, '%S')
  if not pos or string.sub(body, pos, pos) ~= '{' then
    return 'j'
  end
  local depth = 0
  local count = 0
  local model = nil
  local model_type_ok = true
  while true do
    pos = string.find(body, '[{}%[%]"]', pos)
    if not pos then
      return 'j'
    end
    local char = string.sub(body, pos, pos)
    if char == '"' then
      local value, after = read_string(body, pos)
      if not value then
        return 'j'
      end
      pos = after
      if depth == 1 then
        local next_pos = string.find(body, '%S', after)
        if next_pos and string.sub(body, next_pos, next_pos) == ':' and value == 'model' then
          count = count + 1
          local value_pos = string.find(body, '%S', next_pos + 1)
          if value_pos and string.sub(body, value_pos, value_pos) == '"' then
            local name, name_end = read_string(body, value_pos)
            if not name then
              return 'j'
            end
            model, model_type_ok, pos = name, true, name_end
          else
            model, model_type_ok, pos = nil, false, next_pos + 1
          end
        end
      end
    elseif char == '{' or char == '[' then
      depth = depth + 1
      pos = pos + 1
    else
      depth = depth - 1
      pos = pos + 1
      if depth == 0 then
        if string.find(body, '%S', pos) then
          return 'j'
        end
        break
      end
    end
  end
  if count > 1 then
    return 'd'
  elseif count == 0 then
    return 'n'
  elseif not model_type_ok then
    return 't'
  end
  return 'm' .. model
end

-- The top-level keys of the JSON object whose "{" is at "start": key -> position of its
-- value (the last of duplicates, as the engine reads them), or nil when malformed.
local function object_values(body, start)
  local values = {}
  local depth = 0
  local pos = start
  while true do
    pos = string.find(body, '[{}%[%]"]', pos)
    if not pos then
      return nil
    end
    local char = string.sub(body, pos, pos)
    if char == '"' then
      local value, after = read_string(body, pos)
      if not value then
        return nil
      end
      if depth == 1 then
        local colon = string.find(body, '%S', after)
        if colon and string.sub(body, colon, colon) == ':' then
          values[value] = string.find(body, '%S', colon + 1)
        end
      end
      pos = after
    elseif char == '{' or char == '[' then
      depth = depth + 1
      pos = pos + 1
    else
      depth = depth - 1
      pos = pos + 1
      if depth == 0 then
        return values
      end
    end
  end
end

local function is_true(body, pos)
  return pos ~= nil and string.sub(body, pos, pos + 3) == 'true'
end

-- "u" for a streamed request that does not ask for usage (stream_options.include_usage):
-- the engine would then report no tokens for it; "" otherwise.
local function edge_stream_without_usage(body)
  local start = string.find(body, '%S')
  local values = start and object_values(body, start)
  if not values or not is_true(body, values['stream']) then
    return ''
  end
  local options = values['stream_options']
  if options and string.sub(body, options, options) == '{' then
    local inner = object_values(body, options)
    if inner and is_true(body, inner['include_usage']) then
      return ''
    end
  end
  return 'u'
end

-- Seconds until the next calendar month begins (UTC): when a monthly quota resets.
local function edge_month_left()
  local now = os.time()
  local today = os.date('!*t', now)
  local days = ({ 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 })[today.month]
  if today.month == 2 and (today.year % 4 == 0 and (today.year % 100 ~= 0 or today.year % 400 == 0)) then
    days = 29
  end
  local into_day = today.hour * 3600 + today.min * 60 + today.sec
  return (days - today.day) * 86400 + 86400 - into_day
end

-- Usage per key name and model, for Prometheus (the edge_usage filter counts, the
-- edge_usage_metrics service prints).  One Lua state serves every thread (lua-load), so
-- these tables are the process's; they start at zero when HAProxy (re)starts, which
-- Prometheus counters allow.  Keys never appear here: only their names.
local usage = { requests = {}, tokens = {}, latency = {} }
-- Upper bounds of the latency histogram, in seconds: a generation takes from a fraction
-- of a second to minutes.
local latency_buckets = { 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300 }

local function add(tbl, labels, amount)
  tbl[labels] = (tbl[labels] or 0) + amount
end

local function label_value(text)
  return (string.gsub(tostring(text), '[\\"\n]', { ['\\'] = '\\\\', ['"'] = '\\"', ['\n'] = '\\n' }))
end

-- Every series the fleet can have for its key names and models starts at zero, before
-- the first request: Prometheus takes the first value it scrapes of a series as where
-- the series starts, so the requests before that scrape would never show in a rate(),
-- and a latency histogram first seen after its traffic has no increase at all (its
-- quantiles are NaN).  The models are the route map's (<endpoint>:<model> -> backend),
-- the key names the key map's (hash -> role:rate:name:...); lua-load passes both paths.
local function map_keys_and_values(path)
  local pairs_read = {}
  local file = path and io.open(path, 'r')
  if not file then
    return pairs_read
  end
  for line in file:lines() do
    local key, value = string.match(line, '^%s*([^#%s]%S*)%s+(%S+)')
    if key then
      pairs_read[#pairs_read + 1] = { key, value }
    end
  end
  file:close()
  return pairs_read
end

-- The most zero series seed_usage starts per key name and model (see there).
local seed_limit = 30000

local function new_latency_series()
  local series = { buckets = {}, sum = 0, count = 0 }
  for index = 1, #latency_buckets do
    series.buckets[index] = 0
  end
  return series
end

local function seed_usage(routes_map, keys_map)
  local models, names = {}, {}
  for _, pair in ipairs(map_keys_and_values(routes_map)) do
    local model = string.match(pair[1], '^[^:]*:(.+)$')
    if model then
      models[label_value(model)] = true
    end
  end
  for _, pair in ipairs(map_keys_and_values(keys_map)) do
    local name = string.match(pair[2], '^[^:]*:[^:]*:([^:]+)')
    if name then
      names[label_value(name)] = true
    end
  end
  local model_count, name_count = 0, 0
  for model in pairs(models) do
    usage.latency[model] = usage.latency[model] or new_latency_series()
    model_count = model_count + 1
  end
  for _ in pairs(names) do
    name_count = name_count + 1
  end
  -- Three zero series per key name and model; past seed_limit (thousands of keys) only the
  -- latency series start at zero, and a key's first requests show from its second scrape.
  if 3 * model_count * name_count > seed_limit then
    return
  end
  for model in pairs(models) do
    for name in pairs(names) do
      add(usage.requests, string.format('key="%s",model="%s",code="200"', name, model), 0)
      add(usage.tokens, string.format('key="%s",model="%s",kind="prompt"', name, model), 0)
      add(usage.tokens, string.format('key="%s",model="%s",kind="completion"', name, model), 0)
    end
  end
end

-- The last "usage" object of a response's tail: the engine's counts come last, after any
-- generated text (which, being a JSON string, cannot hold an unescaped '"usage":').
local function edge_usage_tokens(tail)
  local object
  for found in string.gmatch(tail, '"usage"%s*:%s*(%b{})') do
    object = found
  end
  if not object then
    return nil
  end
  local prompt = tonumber(string.match(object, '"prompt_tokens"%s*:%s*(%d+)'))
  local completion = tonumber(string.match(object, '"completion_tokens"%s*:%s*(%d+)'))
  return prompt or 0, completion or 0
end

-- Bytes of a response kept to find its usage: the final usage chunk of a stream, or the
-- end of a JSON answer, is far shorter.
local tail_bytes = 4096

local function seconds(now)
  return now.sec + now.usec / 1e6
end

-- Token budgets: tokens a response used, owed by its key until the key's next request
-- through this load balancer adds them to the shared counters (st_tokens_hour and
-- st_tokens_month; HAProxy's rules can add to a counter only while a request is checked).
-- Per key hash: the hour and month they were used in, and how many.
local owed = {}

local function hour_id()
  return os.time() // 3600
end

local function month_id()
  return os.date('!%Y%m')
end

local function owe(hash, tokens)
  local entry = owed[hash]
  local hour, month = hour_id(), month_id()
  if not entry then
    entry = { hour = hour, hour_tokens = 0, month = month, month_tokens = 0 }
    owed[hash] = entry
  end
  if entry.hour ~= hour then
    entry.hour, entry.hour_tokens = hour, 0
  end
  if entry.month ~= month then
    entry.month, entry.month_tokens = month, 0
  end
  entry.hour_tokens = entry.hour_tokens + tokens
  entry.month_tokens = entry.month_tokens + tokens
end

-- Sets txn.owed_hour and txn.owed_month to what the key owes in the current hour and month.
local function edge_take_owed(txn)
  local hash = txn:get_var('txn.key_hash')
  local entry = hash and owed[hash]
  if not entry then
    return
  end
  owed[hash] = nil
  txn:set_var('txn.owed_hour', entry.hour == hour_id() and entry.hour_tokens or 0)
  txn:set_var('txn.owed_month', entry.month == month_id() and entry.month_tokens or 0)
end

local Usage = { id = 'edge usage', flags = filter and filter.FLT_CFG_FL_HTX }
Usage.__index = Usage

function Usage:new()
  return setmetatable({ tail = '' }, Usage)
end

function Usage:start_analyze(txn, chn)
  if not chn:is_resp() then
    self.started = seconds(core.now())
  end
  return filter.CONTINUE
end

function Usage:http_headers(txn, msg)
  if msg.channel:is_resp() then
    local model = txn:get_var('txn.model')
    if model then
      filter.register_data_filter(self, msg.channel)
    end
  end
  return filter.CONTINUE
end

function Usage:http_payload(txn, msg)
  local data = msg:body(0, msg:input())
  if data then
    self.tail = string.sub(self.tail .. data, -tail_bytes)
  end
end

function Usage:end_analyze(txn, chn)
  if not chn:is_resp() or self.counted then
    return filter.CONTINUE
  end
  self.counted = true
  local key = label_value(txn:get_var('txn.key_name') or '')
  local model = label_value(txn:get_var('txn.model') or '')
  local prompt, completion = edge_usage_tokens(self.tail)
  if prompt then
    add(usage.tokens, string.format('key="%s",model="%s",kind="prompt"', key, model), prompt)
    add(usage.tokens, string.format('key="%s",model="%s",kind="completion"', key, model), completion)
    if txn:get_var('txn.token_budget') and prompt + completion > 0 then
      owe(txn:get_var('txn.key_hash'), prompt + completion)
    end
  end
  if model ~= '' and self.started then
    local took = seconds(core.now()) - self.started
    local series = usage.latency[model]
    if not series then
      series = new_latency_series()
      usage.latency[model] = series
    end
    for index, bound in ipairs(latency_buckets) do
      if took <= bound then
        series.buckets[index] = series.buckets[index] + 1
      end
    end
    series.sum = series.sum + took
    series.count = series.count + 1
  end
  return filter.CONTINUE
end

-- Every response, the edge's own answers (401, 429...) included, which no filter sees:
-- counted when its headers leave (http-after-response).
local function edge_usage_count(txn)
  local key = label_value(txn:get_var('txn.key_name') or '')
  local model = label_value(txn:get_var('txn.model') or '')
  add(usage.requests, string.format('key="%s",model="%s",code="%s"', key, model, txn.sf:status()), 1)
end

local function sorted_keys(tbl)
  local keys = {}
  for name in pairs(tbl) do
    keys[#keys + 1] = name
  end
  table.sort(keys)
  return keys
end

-- The Prometheus text format of the tables above.
local function edge_usage_text()
  local lines = {
    '# HELP aphrodite_edge_requests_total Requests answered by this HAProxy process, by API key name, model and status.',
    '# TYPE aphrodite_edge_requests_total counter',
  }
  for _, labels in ipairs(sorted_keys(usage.requests)) do
    lines[#lines + 1] = string.format('aphrodite_edge_requests_total{%s} %d', labels, usage.requests[labels])
  end
  lines[#lines + 1] = '# HELP aphrodite_edge_tokens_total Tokens the engines reported (usage), by API key name, model and kind.'
  lines[#lines + 1] = '# TYPE aphrodite_edge_tokens_total counter'
  for _, labels in ipairs(sorted_keys(usage.tokens)) do
    lines[#lines + 1] = string.format('aphrodite_edge_tokens_total{%s} %d', labels, usage.tokens[labels])
  end
  lines[#lines + 1] = '# HELP aphrodite_edge_request_duration_seconds From the request to the last byte of its response, by model.'
  lines[#lines + 1] = '# TYPE aphrodite_edge_request_duration_seconds histogram'
  for _, model in ipairs(sorted_keys(usage.latency)) do
    local series = usage.latency[model]
    for index, bound in ipairs(latency_buckets) do
      lines[#lines + 1] = string.format('aphrodite_edge_request_duration_seconds_bucket{model="%s",le="%s"} %d',
                                        model, tostring(bound), series.buckets[index])
    end
    lines[#lines + 1] = string.format('aphrodite_edge_request_duration_seconds_bucket{model="%s",le="+Inf"} %d', model, series.count)
    lines[#lines + 1] = string.format('aphrodite_edge_request_duration_seconds_sum{model="%s"} %.6f', model, series.sum)
    lines[#lines + 1] = string.format('aphrodite_edge_request_duration_seconds_count{model="%s"} %d', model, series.count)
  end
  return table.concat(lines, '\n') .. '\n'
end

local function edge_usage_metrics(applet)
  local text = edge_usage_text()
  applet:set_status(200)
  applet:add_header('content-type', 'text/plain; version=0.0.4')
  applet:add_header('content-length', tostring(#text))
  applet:start_response()
  applet:send(text)
end

if core then
  seed_usage(script_args[1], script_args[2])
  core.register_converters('edge_model', edge_model)
  core.register_fetches('edge_month_left', edge_month_left)
  core.register_filter('edge_usage', Usage, function(instance) return instance end)
  core.register_service('edge_usage_metrics', 'http', edge_usage_metrics)
  core.register_action('edge_usage_count', { 'http-after-res' }, edge_usage_count)
  core.register_action('edge_take_owed', { 'http-req' }, edge_take_owed)
  core.register_converters('edge_stream_without_usage', edge_stream_without_usage)
end

return { edge_model = edge_model, edge_usage_tokens = edge_usage_tokens,
         edge_stream_without_usage = edge_stream_without_usage }
