# A PSGI app for Starman behind nogap: answers with the pid that served, and
# shows the Server::Starter variables it was started with.
my $gen = $ENV{NOGAP_GENERATION} // 0;
sub {
    my $body = "pid $$ gen $gen\n";
    [
        200,
        [
            'Content-Type'                => 'text/plain',
            'Content-Length'              => length($body),
            'X-Pid'                       => $$,
            'X-Server-Starter-Port'       => $ENV{SERVER_STARTER_PORT} // '',
            'X-Server-Starter-Generation' => $ENV{SERVER_STARTER_GENERATION} // '',
        ],
        [$body],
    ];
};
