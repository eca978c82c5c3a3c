-- wrk script for the "mixed" targets: the paths given after "--" are requested in
-- turn (one counter for the thread, so each path gets exactly its share), e.g.
--   wrk -s mixed.lua http://host:port -- /a /a /s/hot /flood/x
local paths = {}
local n = 0

function init(args)
   for i, path in ipairs(args) do
      paths[i] = path
   end
   if #paths == 0 then
      paths[1] = "/"
   end
end

function request()
   n = n % #paths + 1
   return wrk.format("GET", paths[n])
end
