using System.Text.Json;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Text;

namespace LoraSharp.Tests.Text;

public class ByteLevelBpeTokenizerTests
{
    // Llama 3's pre-tokenizer regex (tokenizer.json, Split/Isolated).
    const string Llama3Pattern = @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    /// <summary>GPT-2 byte → printable character map, written out independently of the implementation.</summary>
    static string ByteChar(int b)
    {
        var printable = Enumerable.Range('!', '~' - '!' + 1).Concat(Enumerable.Range(0xA1, 12)).Concat(Enumerable.Range(0xAE, 0xFF - 0xAE + 1)).ToList();
        if (printable.Contains(b)) return ((char)b).ToString();
        return ((char)(256 + Enumerable.Range(0, b).Count(x => !printable.Contains(x)))).ToString();
    }

    /// <summary>Vocab: 256 byte tokens (ids 0..255), then merged tokens; merges as listed; one special token.</summary>
    static string WriteTokenizer(TempDir dir, bool ignoreMerges)
    {
        var vocab = new Dictionary<string, int>();
        for (int b = 0; b < 256; b++) vocab[ByteChar(b)] = b;
        string[] merged = ["he", "at", "the", "Ġc", "Ġcat", "Ġdog"];
        foreach (var m in merged) vocab[m] = vocab.Count;
        string[] merges = ["h e", "a t", "t he", "Ġ c", "Ġc at"];
        var json = new Dictionary<string, object?>
        {
            ["version"] = "1.0",
            ["added_tokens"] = new[] { new Dictionary<string, object> { ["id"] = 300, ["content"] = "<|eot_id|>", ["special"] = true },
                                       new Dictionary<string, object> { ["id"] = 301, ["content"] = "<|begin_of_text|>", ["special"] = true } },
            ["normalizer"] = null,
            ["pre_tokenizer"] = new Dictionary<string, object>
            {
                ["type"] = "Sequence",
                ["pretokenizers"] = new object[]
                {
                    new Dictionary<string, object> { ["type"] = "Split", ["pattern"] = new Dictionary<string, string> { ["Regex"] = Llama3Pattern }, ["behavior"] = "Isolated", ["invert"] = false },
                    new Dictionary<string, object> { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = true, ["use_regex"] = false },
                },
            },
            ["decoder"] = new Dictionary<string, object> { ["type"] = "ByteLevel" },
            ["model"] = new Dictionary<string, object> { ["type"] = "BPE", ["ignore_merges"] = ignoreMerges, ["vocab"] = vocab, ["merges"] = merges },
        };
        var path = dir.File("tokenizer.json");
        File.WriteAllText(path, JsonSerializer.Serialize(json));
        return path;
    }

    [Fact]
    public void Merges_apply_by_rank_within_pre_tokens()
    {
        using var dir = new TempDir();
        var tok = ByteLevelBpeTokenizer.Load(WriteTokenizer(dir, ignoreMerges: false));
        // "the" -> t,h,e -> t,he -> the ; " cat" -> Ġ,c,a,t -> Ġ,c,at -> Ġc,at -> Ġcat ; "!" is byte 33
        Assert.Equal([258, 260, 33], tok.Encode("the cat!"));
        // no merges lead to "Ġdog": bytes only
        Assert.Equal(32, tok.TokenToId("Ġ")); // the space byte
        Assert.Equal(new int[] { 32, 'd', 'o', 'g' }, tok.Encode(" dog"));
    }

    [Fact]
    public void Ignore_merges_takes_a_whole_pre_token_from_the_vocabulary()
    {
        using var dir = new TempDir();
        var tok = ByteLevelBpeTokenizer.Load(WriteTokenizer(dir, ignoreMerges: true));
        Assert.Equal([tok.TokenToId("Ġdog")!.Value], tok.Encode(" dog"));
    }

    [Fact]
    public void Any_unicode_text_round_trips_through_byte_tokens()
    {
        using var dir = new TempDir();
        var tok = ByteLevelBpeTokenizer.Load(WriteTokenizer(dir, ignoreMerges: true));
        foreach (var text in new[] { "héllo wörld 😀", "日本語\n\ttabs  and   spaces ", "", "12345 678" })
            Assert.Equal(text, tok.Decode(tok.Encode(text)));
        // "é" is two UTF-8 bytes: two tokens
        Assert.Equal([0xC3, 0xA9], tok.Encode("é"));
    }

    [Fact]
    public void Special_tokens_are_split_out_only_when_asked_and_skipped_on_decode()
    {
        using var dir = new TempDir();
        var tok = ByteLevelBpeTokenizer.Load(WriteTokenizer(dir, ignoreMerges: true));
        var ids = tok.EncodeWithSpecialTokens("<|begin_of_text|>the<|eot_id|>");
        Assert.Equal([301, 258, 300], ids);
        Assert.DoesNotContain(300, tok.Encode("the<|eot_id|>"));
        Assert.Equal("the", tok.Decode(ids));
        Assert.Equal("<|begin_of_text|>the<|eot_id|>", tok.Decode(ids, skipSpecialTokens: false));
    }

    [Fact]
    public void Folder_with_tokenizer_json_and_config_gives_special_ids_and_chat_format()
    {
        using var dir = new TempDir();
        WriteTokenizer(dir, ignoreMerges: true);
        File.WriteAllText(dir.File("tokenizer_config.json"), """
            { "bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}, "add_bos_token": true,
              "chat_template": "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}" }
            """);
        File.WriteAllText(dir.File("generation_config.json"), """{ "bos_token_id": 301, "eos_token_id": [300, 5] }""");
        var tok = LlmTokenizer.Load(dir.Path);
        Assert.Equal(301, tok.BosId);
        Assert.Equal(300, tok.EosId);
        Assert.Equal(ChatFormat.Llama3, tok.ChatFormat);
        Assert.Equal([300, 5], tok.StopTokenIds);
        Assert.Equal([301, 258], tok.Encode("the"));
        var chat = tok.EncodeChat([ChatMessage.User("the")]);
        Assert.Equal(301, chat[0]);
        Assert.Equal("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nthe<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            tok.Decode(chat, skipSpecialTokens: false));
    }

    [Fact]
    public void Non_byte_level_tokenizer_json_is_a_clear_error()
    {
        using var dir = new TempDir();
        File.WriteAllText(dir.File("tokenizer.json"), """{ "model": { "type": "Unigram", "vocab": [] } }""");
        var e = Assert.Throws<LoraSharpException>(() => ByteLevelBpeTokenizer.Load(dir.File("tokenizer.json")));
        Assert.Equal("model.type", e.Key);
    }
}
