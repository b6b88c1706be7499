using LoraSharp.Tests.Infrastructure;
using LoraSharp.Text;
using LoraSharp.Training.Llm;
using LoraSharp.Training.Optim;
using TorchSharp;
using TorchSharp.Modules;
using ParamGroup = LoraSharp.Training.Optim.ParamGroup;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Training.LlmTraining;

public class LlmConfigDataTests
{
    [Fact]
    public void Example_configs_parse_with_axolotl_keys()
    {
        foreach (var name in new[] { "lora.yaml", "qlora.yaml" })
        {
            var c = LlmTrainConfig.Load(Path.Combine(ReferenceData.RepoRoot, "examples", "llm", name));
            Assert.True(Directory.Exists(c.Resolve(c.BaseModel)), c.Resolve(c.BaseModel));
            Assert.All(c.Datasets, d => Assert.True(File.Exists(c.Resolve(d.Path))));
        }
        var q = LlmTrainConfig.Load(Path.Combine(ReferenceData.RepoRoot, "examples", "llm", "qlora.yaml"));
        Assert.True(q.IsQLora && q.Uses8BitOptimizer && q.Bf16 && q.GradientCheckpointing);
    }

    [Fact]
    public void Unknown_key_is_an_error_listing_the_valid_keys()
    {
        var e = Assert.Throws<LoraSharpException>(() => LlmTrainConfig.Parse("base_model: x\nlora_rank: 8\n", "c.yaml"));
        Assert.Contains("unknown key 'lora_rank'", e.Message);
        Assert.Contains("lora_r, lora_alpha", e.Message);
        Assert.Equal("c.yaml", e.FilePath);
        var bad = Assert.Throws<LoraSharpException>(() => LlmTrainConfig.Parse("base_model: x\ndatasets: [{path: a, type: alpaca}]\nlearning_rate: fast\n", "c.yaml"));
        Assert.Equal("learning_rate", bad.Key);
    }

    [Fact]
    public void Peft_prefixed_aliases_and_defaults()
    {
        var c = LlmTrainConfig.Parse("base_model: m\ndatasets:\n  - path: d.jsonl\nadapter: lora\nlora_target_linear: true\npeft_use_rslora: true\npeft_use_dora: true\noptimizer: adamw_bnb_8bit\n");
        Assert.True(c.UseRslora && c.UseDora && c.Uses8BitOptimizer);
        Assert.Equal(LlmDatasetType.Alpaca, c.Datasets[0].Type);
        Assert.Equal(LrScheduleKind.Cosine, c.LrScheduler);
    }

    [Fact]
    public void Malformed_jsonl_line_is_reported_with_file_and_line()
    {
        using var dir = new TempDir();
        File.WriteAllLines(dir.File("d.jsonl"), ["{\"instruction\": \"a\", \"output\": \"b\"}", "", "{\"instruction\": \"a\" \"output\": 1}"]);
        File.WriteAllText(dir.File("c.yaml"), $"base_model: {LlmTestModels.ReferenceModel}\ndatasets:\n  - path: d.jsonl\n    type: alpaca\n");
        var c = LlmTrainConfig.Load(dir.File("c.yaml"));
        var e = Assert.Throws<LoraSharpException>(() => LlmData.Load(c, LlmTokenizer.Load(LlmTestModels.ReferenceModel)));
        Assert.Contains("line 3", e.Message);
        Assert.Equal(dir.File("d.jsonl"), e.FilePath);
    }

    [Fact]
    public void Prompt_labels_are_masked_unless_train_on_inputs_and_chat_trains_assistant_turns_only()
    {
        var tok = LlmTokenizer.Load(LlmTestModels.ReferenceModel);
        var alpaca = new LlmDatasetConfig { Path = "x", Type = LlmDatasetType.Alpaca };
        var line = System.Text.Json.Nodes.JsonNode.Parse("{\"instruction\": \"name it\", \"output\": \"red\"}")!.AsObject();
        var s = LlmData.Encode(line, alpaca, null, tok, trainOnInputs: false);
        var promptLen = tok.Encode(LlmData.AlpacaPrompt("name it", null), addBos: true, addEos: false).Count;
        Assert.All(s.Labels.Take(promptLen), l => Assert.Equal(-100, l));
        Assert.Equal(s.InputIds.Skip(promptLen), s.Labels.Skip(promptLen));
        Assert.Equal(tok.EosId, s.InputIds[^1]);
        var all = LlmData.Encode(line, alpaca, null, tok, trainOnInputs: true);
        Assert.Equal(all.InputIds, all.Labels);

        var chat = new LlmDatasetConfig { Path = "x", Type = LlmDatasetType.Chat };
        var conv = System.Text.Json.Nodes.JsonNode.Parse("{\"conversations\": [{\"from\": \"human\", \"value\": \"hi\"}, {\"from\": \"gpt\", \"value\": \"yes\"}]}")!.AsObject();
        var c = LlmData.Encode(conv, chat, ChatFormat.ChatML, tok, trainOnInputs: false);
        var header = tok.EncodeChat([ChatMessage.User("hi")], addGenerationPrompt: true, format: ChatFormat.ChatML);
        Assert.Equal(tok.EncodeChat([ChatMessage.User("hi"), ChatMessage.Assistant("yes")], addGenerationPrompt: false, format: ChatFormat.ChatML), c.InputIds);
        Assert.All(c.Labels.Take(header.Count), l => Assert.Equal(-100, l));
        Assert.Equal(c.InputIds.Skip(header.Count), c.Labels.Skip(header.Count));
    }

    [Fact]
    public void Shuffling_is_deterministic_by_seed()
    {
        Assert.Equal(LlmData.Permutation(50, 3), LlmData.Permutation(50, 3));
        Assert.NotEqual(LlmData.Permutation(50, 3), LlmData.Permutation(50, 4));
        Assert.Equal(Enumerable.Range(0, 50), LlmData.Permutation(50, 3).Order());
    }

    [Fact]
    public void AdamW_matches_torch_optim_AdamW_and_8bit_stays_close()
    {
        torch.manual_seed(0);
        using var init = torch.randn(300, 7);
        Parameter Fresh() => new(init.clone(), requires_grad: true);
        var pt = Fresh(); var mine = Fresh(); var q8 = Fresh();
        using var reference = torch.optim.AdamW([pt], lr: 0.01, weight_decay: 0.1);
        using var adam = new AdamWOptimizer([new ParamGroup("p", [mine], 0.01)], (0.9, 0.999), 1e-8, weightDecay: 0.1);
        using var adam8 = new AdamWOptimizer([new ParamGroup("p", [q8], 0.01)], (0.9, 0.999), 1e-8, weightDecay: 0.1, eightBit: true);
        for (int step = 0; step < 25; step++)
        {
            foreach (var p in new[] { pt, mine, q8 })
            {
                using var loss = (p * p * p).sum() + p.sin().sum();
                loss.backward();
            }
            reference.step(); adam.Step(); adam8.Step();
            reference.zero_grad(); adam.ZeroGrad(); adam8.ZeroGrad();
        }
        Assert.True(torch.allclose(pt, mine, 1e-6, 1e-6), $"max diff {(pt - mine).abs().max().item<float>()}");
        double rel = ((pt - init) - (q8 - init)).norm().item<float>() / (pt - init).norm().item<float>();
        Assert.True(rel < 0.05, $"8-bit update differs by {rel:P1}");
        Assert.True(adam8.StateBytes < adam.StateBytes / 3);
    }
}
