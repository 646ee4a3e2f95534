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

if core then
  core.register_converters('edge_model', edge_model)
  core.register_fetches('edge_month_left', edge_month_left)
end

return edge_model
