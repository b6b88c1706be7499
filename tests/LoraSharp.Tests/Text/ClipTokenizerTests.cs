using System.Text.Json.Nodes;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Text;

namespace LoraSharp.Tests.Text;

public class ClipTokenizerTests
{
    static readonly Lazy<ClipTokenizer> Tokenizer = new(() => ClipTokenizer.FromFolder(ReferenceData.PathOf("sd", "tokenizer")));

    static JsonArray Cases() => ReferenceData.ReadJson("sd", "tokenizer", "tokenizer_cases.json")["cases"]!.AsArray();

    public static TheoryData<int, string> CaseIndices()
    {
        var data = new TheoryData<int, string>();
        var cases = Cases();
        for (int i = 0; i < cases.Count; i++)
        {
            var prompt = (string)cases[i]!["prompt"]!;
            data.Add(i, prompt.Length > 40 ? prompt[..40] : prompt);
        }
        return data;
    }

    [Theory]
    [MemberData(nameof(CaseIndices))]
    public void Clip_tokenizer_reproduces_reference_case(int index, string label)
    {
        _ = label;
        var c = Cases()[index]!;
        var prompt = (string)c["prompt"]!;
        var tok = Tokenizer.Value;

        var expectedTokens = c["tokens"]!.AsArray().Select(t => (string)t!).ToArray();
        Assert.Equal(expectedTokens, tok.Tokenize(prompt));

        var expectedUntruncated = c["ids_untruncated"]!.AsArray().Select(t => (int)t!).ToArray();
        Assert.Equal(expectedUntruncated, tok.EncodeUntruncated(prompt));

        var expectedIds = c["input_ids"]!.AsArray().Select(t => (int)t!).ToArray();
        Assert.Equal(expectedIds, tok.Encode(prompt));
    }

    [Fact]
    public void Special_ids_and_vocabulary_size_match_clip()
    {
        var tok = Tokenizer.Value;
        Assert.Equal(49406, tok.BosId);
        Assert.Equal(49407, tok.EosId);
        Assert.Equal(49407, tok.PadId);
        Assert.Equal(49408, tok.VocabSize);
        Assert.Equal(267, tok.CommaId);
    }

    [Fact]
    public void Openai_bpe_file_gives_the_same_vocabulary_as_vocab_json()
    {
        using var tmp = new TempDir();
        File.Copy(ReferenceData.PathOf("sd", "tokenizer", "bpe_simple_vocab_16e6.txt.gz"), tmp.File("bpe_simple_vocab_16e6.txt.gz"));
        var fromBpe = ClipTokenizer.FromFolder(tmp.Path);
        const string prompt = "masterpiece, best quality, (blue eyes:1.2), girl sitting on a bench, café 猫";
        Assert.Equal(Tokenizer.Value.Encode(prompt), fromBpe.Encode(prompt));
        Assert.Equal(Tokenizer.Value.VocabSize, fromBpe.VocabSize);
    }

    [Fact]
    public void Diffusers_model_root_with_tokenizer_subfolder_loads()
    {
        using var tmp = new TempDir();
        var sub = Directory.CreateDirectory(Path.Combine(tmp.Path, "tokenizer")).FullName;
        File.Copy(ReferenceData.PathOf("sd", "tokenizer", "vocab.json.gz"), Path.Combine(sub, "vocab.json.gz"));
        File.Copy(ReferenceData.PathOf("sd", "tokenizer", "merges.txt.gz"), Path.Combine(sub, "merges.txt.gz"));
        var tok = ClipTokenizer.FromFolder(tmp.Path);
        Assert.Equal([49406, 320, 1125, 539, 320, 2368, 49407], tok.EncodeUntruncated("a photo of a cat"));
    }

    [Fact]
    public void Decode_inverts_encode_for_normalized_text()
    {
        var tok = Tokenizer.Value;
        const string text = "a photo of a cat in a café crème brûlée";
        Assert.Equal(text, tok.Decode(tok.Encode(text)));
    }

    [Fact]
    public void Missing_tokenizer_files_give_a_clear_error()
    {
        using var tmp = new TempDir();
        var e = Assert.Throws<LoraSharpException>(() => ClipTokenizer.FromFolder(tmp.Path));
        Assert.Contains("vocab.json", e.Message);
    }

    [Fact]
    public void Malformed_merges_line_names_file_and_line()
    {
        using var tmp = new TempDir();
        File.WriteAllText(tmp.File("vocab.json"), """{"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}""");
        File.WriteAllText(tmp.File("merges.txt"), "#version: 0.2\na b\nbroken\n");
        var e = Assert.Throws<LoraSharpException>(() => ClipTokenizer.FromFolder(tmp.Path));
        Assert.Contains("merges.txt", e.Message);
        Assert.Contains("line 3", e.Message);
    }

    [Theory]
    [InlineData("  A\tB\u001fC\n ", "a b c")]
    [InlineData("ΟΔΟΣ ΣΑ", "οδος σα")]
    [InlineData("İstanbul", "i\u0307stanbul")]
    public void Normalize_matches_python_whitespace_clean_and_lower(string input, string expected) =>
        Assert.Equal(expected, ClipTokenizer.Normalize(input));

    [Fact]
    public void Reference_prompts_tokenize_to_the_recorded_text_encoder_and_sampler_inputs()
    {
        var prompts = ReferenceData.ReadJson("sd", "manifest.json")["prompts"]!.AsArray().Select(p => (string)p!).ToArray();
        using var te = LoraSharp.IO.SafetensorsFile.Open(ReferenceData.PathOf("sd", "forward", "te_ref.safetensors"));
        using var ids = te.Load("input_ids");
        for (int i = 0; i < prompts.Length; i++)
            Assert.Equal(ids[i].data<long>().Select(v => (int)v).ToArray(), Tokenizer.Value.Encode(prompts[i]));

        using var sampler = LoraSharp.IO.SafetensorsFile.Open(ReferenceData.PathOf("sd", "samplers", "euler.safetensors"));
        using var samplerIds = sampler.Load("input_ids"); // [uncond "", cond "a photo of a cat"]
        Assert.Equal(samplerIds[0].data<long>().Select(v => (int)v).ToArray(), Tokenizer.Value.Encode(""));
        Assert.Equal(samplerIds[1].data<long>().Select(v => (int)v).ToArray(), Tokenizer.Value.Encode("a photo of a cat"));
    }
}
