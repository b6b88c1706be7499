using LoraSharp.Tests.Infrastructure;
using LoraSharp.Text;

namespace LoraSharp.Tests.Text;

public class TextStreamerTests
{
    [Fact]
    public void Streamed_pieces_concatenate_to_the_decoded_text()
    {
        var tok = SentencePieceTokenizer.Load(ReferenceData.PathOf("llm", "tokenizer", "tokenizer_bytefallback.model"));
        var text = "café naïve 日本語 emoji 😀 ok";
        var ids = tok.Encode(text);
        var streamer = new TextStreamer(tok);
        var pieces = ids.Select(streamer.Push).ToList();
        Assert.Equal(text, string.Concat(pieces));
        Assert.DoesNotContain(pieces, p => p.Contains('\uFFFD'));
        Assert.Contains("", pieces); // multi-byte characters were held back until complete
    }
}
