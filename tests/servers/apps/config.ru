# A Rack app for puma and unicorn behind nogap: answers with the pid that
# served; /slow answers after 3 s (a request in progress when a reload stops
# the worker).
generation = ENV.fetch("NOGAP_GENERATION", "0")
run lambda { |env|
  if env["PATH_INFO"] == "/slow"
    $stderr.puts "slow request started pid #{Process.pid}"
    $stderr.flush
    sleep 3
  end
  body = "pid #{Process.pid} gen #{generation}\n"
  [200, { "content-type" => "text/plain", "content-length" => body.bytesize.to_s,
          "x-pid" => Process.pid.to_s }, [body]]
}
